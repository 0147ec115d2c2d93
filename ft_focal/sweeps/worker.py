"""A sweep worker: pull trials from the study until the study's budget is spent.

Any number of workers (processes, GPUs, machines) run this against one storage; Optuna's storage
hands out the trials (queued retries first, then the sampler's proposals). After its last trial a
worker waits for the trials other workers still run, so that a trial whose worker dies is taken
over (its heartbeat goes stale, `fail_stale_trials` re-queues it) instead of being lost; `--no-wait`
leaves that to the other workers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Optional

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from ft_focal.errors import UserError
from ft_focal.sweeps.report import listed_trials
from ft_focal.sweeps.runner import TrialCrashed, TrialInterrupted, TrialRunner
from ft_focal.sweeps.spec import SweepSpec
from ft_focal.sweeps.study import (
    CRASHED,
    INTERRUPTED,
    StudyBudget,
    build_pruner,
    build_sampler,
    open_storage,
    reclaim_dead_local_trials,
    retry_callback,
    worker_seed_of,
)

logger = logging.getLogger(__name__)


def study_budget(spec: SweepSpec) -> int:
    """The study's number of trials: `trials`, or fewer when the space has fewer configurations."""
    if all(p.type == "categorical" or p.type == "int" or p.step is not None for p in spec.space):
        return min(spec.trials, math.prod(len(p.grid_values()) for p in spec.space))
    return spec.trials


def sweep_fingerprint(spec: SweepSpec) -> str:
    """What makes two invocations the same study: recipe, fixed keys, space, objective, seeds."""
    return json.dumps({"recipe": spec.recipe, "fixed": spec.fixed, "objective": spec.objective, "seeds": spec.seeds,
                       "space": [vars(p) for p in spec.space]}, sort_keys=True, default=str)


def load_study(spec: SweepSpec, storage_url: str) -> optuna.Study:
    """The sweep's study (created on first use); refuses a study of the same name made from another
    sweep definition, whose trials would not be comparable."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress lines are ours (one per trial)
    storage = open_storage(storage_url, spec.faults)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=build_pruner(spec.pruner))
    study.sampler = build_sampler(spec, worker_seed_of(spec, study))
    fingerprint = sweep_fingerprint(spec)
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", fingerprint)
    elif stored != fingerprint:
        raise UserError(f"{spec.source}: the study '{spec.name}' in this storage was made from another sweep definition "
                        "(recipe, fixed keys, space, objective or seeds differ); give the sweep another name or "
                        "output_dir")
    return study


class Progress:
    """One line per finished trial (also in batch logs): state, objective, time, study progress."""

    def __init__(self, spec: SweepSpec, budget: int) -> None:
        self.spec, self.budget = spec, budget

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(INTERRUPTED):
            retry_callback(self.spec.faults)(study, trial)  # stopped by --timeout: the next run resumes it
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and bool(
            t.user_attrs.get(CRASHED))) for t in listed_trials(study))
        seconds = trial.user_attrs.get("seconds")
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        if trial.state == TrialState.COMPLETE:
            val = trial.user_attrs.get("val") or {}
            what = (f"complete: val {self.spec.objective} {100 * trial.value:.2f}% (overall / many / medium / few "
                    + " / ".join("n/a" if val.get(k) is None else f"{100 * val[k]:.1f}" for k in
                                 ("overall", "many", "medium", "few")) + ")")
        elif trial.state == TrialState.PRUNED:
            if trial.user_attrs.get("duplicate_of") is not None:
                return
            what = f"pruned after epoch {trial.user_attrs.get('pruned_at_epoch')}"
        else:
            what = f"failed: {trial.user_attrs.get(CRASHED) or trial.user_attrs.get(INTERRUPTED) or 'error'}"
        try:
            best = f"; best {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        logger.info("trial %d %s%s [%d/%d done%s]", trial.number, what, took, done, self.budget, best)


def run_worker(spec: SweepSpec, storage_url: str, launch: Optional[str] = None, gpu: Optional[str] = None,
               timeout: Optional[float] = None, wait_for_others: bool = True) -> optuna.Study:
    """Run trials of the study until its budget is spent (or `timeout` seconds passed)."""
    study = load_study(spec, storage_url)
    budget = StudyBudget(study_budget(spec))
    deadline = None if timeout is None else time.time() + timeout
    runner = TrialRunner(spec, storage_url, launch, gpu, deadline)
    callbacks = [budget, Progress(spec, budget._n_trials)]
    waiting_logged = False
    while deadline is None or time.time() < deadline:
        reclaim_dead_local_trials(study, spec.faults)
        fail_stale_trials(study)  # heartbeat older than the grace period: failed and re-queued
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if queued or not budget.spent(study):
            remaining = None if deadline is None else max(1.0, deadline - time.time())
            study.optimize(runner, timeout=remaining, callbacks=callbacks, catch=(TrialCrashed, TrialInterrupted),
                           gc_after_trial=False)
            waiting_logged = False
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or not wait_for_others:
            break
        if not waiting_logged:
            logger.info("waiting for %d trial(s) other workers run (taken over if a heartbeat stops for %d s)",
                        len(running), spec.faults.grace_seconds)
            waiting_logged = True
        time.sleep(min(spec.faults.heartbeat_seconds, 5.0))
    return study
