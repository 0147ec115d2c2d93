"""`ft-focal sweep SWEEP.yaml [key=value ...]`: a hyperparameter search on Optuna (ft_focal/sweeps/).

Rerunning the same command continues the study; the same command with `--storage URL` started on
any number of machines pulls trials from one study. `--gpus 0,1,2,3` (or `--workers N` on the CPU)
starts one worker per GPU on this machine; `--launch "accelerate launch --config_file ..."` runs
each trial over several processes. The report (sweep.md, plots, best.yaml, top_trials/) is written
when this command's workers have nothing left to run.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import list_flag, run_guarded
from ft_focal.errors import UserError

logger = logging.getLogger("ft_focal.sweep")


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _parser() -> CommandParser:
    parser = CommandParser(prog="ft-focal sweep", description="Hyperparameter sweep of a recipe (Optuna); key=value "
                           "overrides set sweep keys (trials=4, pruner.name=none) or fixed recipe keys (train.epochs=2).")
    parser.add_argument("sweep", help="sweep YAML file (e.g. sweeps/demo_focal_sam.yaml)")
    parser.add_argument("--storage", help="Optuna storage URL shared by all workers (default: sqlite:///<output_dir>/"
                        "study.db), e.g. postgresql+psycopg://user:password@host/db")
    parser.add_argument("--launch", help="command prefix of each trial's run, e.g. \"accelerate launch --config_file "
                        "recipes/accelerate/multi_gpu_bf16.yaml\" (default: this Python)")
    parser.add_argument("--gpus", nargs="+", help="one worker per GPU on this machine, e.g. --gpus 0,1,2,3")
    parser.add_argument("--workers", type=int, default=1, help="workers on this machine without GPUs (default 1)")
    parser.add_argument("--timeout", type=float, help="wall-clock bound of the sweep in seconds: no trial starts "
                        "after it and a running one is stopped (and resumes on the next run)")
    parser.add_argument("--no-wait", action="store_true", help="stop when no trial is left to start, without "
                        "waiting for (and taking over) trials other workers run")
    parser.add_argument("--report-only", action="store_true", help="write sweep.md, plots and best.yaml, run nothing")
    parser.add_argument("--gpu", help=argparse.SUPPRESS)  # a spawned worker's CUDA_VISIBLE_DEVICES
    return parser


def _run(argv: Optional[list[str]]) -> int:
    args = _parser().parse_command(argv)
    from ft_focal.sweeps.spec import load_sweep

    spec = load_sweep(args.sweep, args.overrides)
    from ft_focal.sweeps.report import write_sweep_report
    from ft_focal.sweeps.study import default_storage_url, redact_url
    from ft_focal.sweeps.worker import load_study, run_worker

    storage = args.storage or default_storage_url(spec)
    started = time.time()
    gpus = list_flag(args.gpus, str, "--gpus")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.report_only:
        study = load_study(spec, storage)
    elif gpus or args.workers > 1:
        logger.info("sweep %s: %d workers on %s", spec.name, len(gpus or []) or args.workers, redact_url(storage))
        _spawn_workers(args, storage, gpus or [None] * args.workers)
        study = load_study(spec, storage)
    else:
        logger.info("sweep %s: %d trials in all, storage %s, folder %s", spec.name, spec.trials, redact_url(storage),
                    spec.output_dir)
        study = run_worker(spec, storage, args.launch, args.gpu, args.timeout, wait_for_others=not args.no_wait)
    path = write_sweep_report(spec, study, time.time() - started)
    logger.info("sweep report: %s", path)
    return 0


def _spawn_workers(args: argparse.Namespace, storage: str, gpus: list) -> None:
    """One `ft-focal sweep` worker process per GPU (CUDA_VISIBLE_DEVICES of its trials) or per --workers."""
    base = [sys.executable, "-m", "ft_focal.cli", "sweep", args.sweep, *args.overrides, "--storage", storage]
    for flag, value in (("--launch", args.launch), ("--timeout", args.timeout)):
        if value is not None:
            base += [flag, str(value)]
    base += ["--no-wait"] if args.no_wait else []
    workers = [subprocess.Popen(base + ([f"--gpu={gpu}"] if gpu is not None else []), env=dict(os.environ))
               for gpu in gpus]
    codes = [w.wait() for w in workers]
    if any(codes):
        raise UserError(f"sweep workers ended with exit codes {codes}; see their lines above")
