"""The trial side of pruning: a training run started by `ft-focal sweep` reports its validation
objective to the study after each epoch-end evaluation and stops when the study's pruner says so.

The sweep worker passes the trial in the environment variable `FT_FOCAL_SWEEP_TRIAL` (JSON: storage
URL, study name, trial id, objective, step offset, pruner settings, marker file), so the recipe
stays the plain recipe a user can rerun with `ft-focal train`. The main process asks the storage;
its decision is broadcast so every process of a multi-process launch stops at the same epoch
(none waits in a collective for a rank that left). A pruned run writes `pruned.json` into its
output folder and exits with `PRUNED_EXIT_CODE`; its checkpoints and logs stay.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ft_focal.sweeps.objective import objective_value

logger = logging.getLogger(__name__)

TRIAL_ENV = "FT_FOCAL_SWEEP_TRIAL"
PRUNED_EXIT_CODE = 75
PRUNED_MARKER = "pruned.json"

def validation_hook_from_env() -> Optional[Callable]:
    """The pruning callback of a sweep trial (`Trainer.on_validation`), or None outside a sweep."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    return PruningReporter(json.loads(text))


class PruningReporter:
    """`on_validation(trainer, epoch, val)`: report the objective at step offset + epoch, then stop
    the run on every process if the pruner prunes the trial."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from ft_focal.sweeps.study import build_pruner, open_storage

            s = self.settings
            storage = open_storage(s["storage"], heartbeat=None)  # the worker keeps the heartbeat
            study = optuna.load_study(study_name=s["study"], storage=storage, pruner=build_pruner(s["pruner"]))
            self._trial = optuna.trial.Trial(study, s["trial_id"])
        return self._trial

    def __call__(self, trainer: Any, epoch: int, val: dict) -> None:
        s, acc = self.settings, trainer.parts.accelerator
        decision = [False, None]
        if acc.is_main_process:
            value = objective_value(val, s["objective"])
            if value is not None:
                trial, step = self._optuna_trial(), int(s["step_offset"]) + epoch
                trial.report(value, step)
                decision = [bool(trial.should_prune()), value]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list(decision, from_process=0)
        if not decision[0]:
            return
        if acc.is_main_process:
            marker = Path(trainer.out) / PRUNED_MARKER
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(json.dumps({"epoch": epoch, "step": trainer.state.step, "objective": decision[1]}))
            os.replace(tmp, marker)
            logger.info("pruned by the sweep after epoch %d (val %s %.4f): checkpoints and logs stay in %s",
                        epoch, s["objective"], decision[1], trainer.out)
        trainer.log.close()
        acc.wait_for_everyone()
        sys.exit(PRUNED_EXIT_CODE)
