"""Hyperparameter sweeps on Optuna: `ft-focal sweep SWEEP.yaml` (ft_focal/commands/sweep.py).

spec.py (the sweep file), study.py (storage, sampler, pruner, budget, fault recovery), runner.py
(a trial = one normal run per seed, in a subprocess), pruning.py (the run's side of pruning),
worker.py (the trial loop), report.py (sweep.md, plots, best.yaml). Importing this package does
not import Optuna (the training loop imports pruning.py).
"""
