"""The Optuna side of a sweep: storage, sampler, pruner, the study's trial budget, and taking over
the trials of dead workers. Optuna's storage is what spreads one study over processes and machines
(docs/design.md, "Sweeps"); nothing here schedules.

Fault model: a running trial's worker writes a heartbeat into an RDB storage; a trial whose
heartbeat is older than the grace period is failed by the next worker that looks
(`optuna.storages.fail_stale_trials`) and re-queued by `RetryHeartbeatStaleTrialCallback` with the
same parameters and `retried_trial_number` = the original trial, whose folder (and checkpoints) the
retry continues in. A worker on the same host as a dead worker does not wait for the grace period:
it sees that the process which ran the trial is gone (`reclaim_dead_local_trials`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ft_focal.errors import UserError, one_line
from ft_focal.sweeps.spec import FaultSpec, PrunerSpec, SweepSpec

# Optuna marks heartbeats, retries and its plots experimental; the sweep relies on them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

logger = logging.getLogger(__name__)

# user attributes a trial carries (ft_focal/sweeps/runner.py writes them)
CRASHED, INTERRUPTED, DUPLICATE_OF, WORKER = "crashed", "interrupted", "duplicate_of", "worker"


def default_storage_url(spec: SweepSpec) -> str:
    """A SQLite file in the sweep folder: nothing to set up, and rerunning continues the study."""
    return f"sqlite:///{(Path(spec.output_dir) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: Optional[FaultSpec], attempts: int = 5) -> RDBStorage:
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL URL). With `heartbeat`, running trials send
    a heartbeat and stale ones are retried (`max_retry` times) in their original folder."""
    if "://" not in url:
        raise UserError(f"--storage {url!r}: not a storage URL (e.g. sqlite:///sweep.db or "
                        "postgresql+psycopg://user@host/db)")
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        engine["connect_args"] = {"timeout": 120}  # concurrent workers wait for SQLite's write lock
    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        kwargs = dict(heartbeat_interval=heartbeat.heartbeat_seconds, grace_period=heartbeat.grace_seconds,
                      heartbeat_stale_trial_callback=retry_callback(heartbeat))
    for attempt in range(attempts):  # two workers creating the same new database race on its tables
        try:
            return RDBStorage(url, engine_kwargs=engine, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy / driver errors: one line at the end
            if attempt == attempts - 1:
                raise UserError(f"--storage {redact_url(url)}: cannot open the study storage ({one_line(exc, 200)})") from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def redact_url(url: str) -> str:
    """A storage URL without its password (`postgresql://user:***@host/db`)."""
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        tail = f"{user}:***@{tail.split('@', 1)[1]}"
    return head + sep + tail


def retry_callback(faults: FaultSpec) -> RetryHeartbeatStaleTrialCallback:
    return RetryHeartbeatStaleTrialCallback(max_retry=faults.max_retry)


def build_sampler(spec: SweepSpec, worker_seed: int) -> optuna.samplers.BaseSampler:
    """grid / random / TPE. `worker_seed` differs between concurrent workers (`worker_seed_of`)."""
    kind = spec.sampler.name
    if kind == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.space}, seed=worker_seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=worker_seed)
    return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=spec.sampler.startup_trials)


def worker_seed_of(spec: SweepSpec, study: optuna.Study) -> int:
    """The sampler seed of this worker. A worker that starts alone on a fresh study uses the sweep's
    seed (a one-worker sweep is reproducible); a worker that joins a study with trials mixes in how
    many there are and, when others are running, its host and process id, so that concurrent
    workers do not propose the same sequence (duplicates are skipped anyway: `find_duplicate`)."""
    trials = study.get_trials(deepcopy=False)
    seed = spec.sampler.seed + 7919 * len(trials)
    if any(t.state == TrialState.RUNNING for t in trials):
        seed += zlib.crc32(f"{host_name()}:{os.getpid()}".encode())
    return seed % 2**31


def host_name() -> str:
    """This machine's name in a running trial's `worker` attribute (FT_FOCAL_SWEEP_HOST overrides it)."""
    return os.environ.get("FT_FOCAL_SWEEP_HOST") or socket.gethostname()


def build_pruner(pruner: PrunerSpec | dict) -> optuna.pruners.BasePruner:
    """none / median / successive halving / Hyperband; steps are reported epochs (ft_focal/sweeps/pruning.py)."""
    p = PrunerSpec(**pruner) if isinstance(pruner, dict) else pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """A trial that uses up one of the study's `trials`: finished (complete, pruned, crashed),
    running or queued. Not: a duplicate of another trial's configuration, nor a trial failed
    because its worker died or the sweep's timeout stopped it (its retry counts instead)."""
    if trial.user_attrs.get(DUPLICATE_OF) is not None:
        return False
    if trial.state == TrialState.FAIL:
        return bool(trial.user_attrs.get(CRASHED))
    return True


class StudyBudget(optuna.study.MaxTrialsCallback):
    """`MaxTrialsCallback` over the whole study (all workers), counting `counts_toward_budget`
    trials, so that running and queued trials of other workers are not started twice over."""

    def __init__(self, n_trials: int) -> None:
        super().__init__(n_trials, states=None)

    def used(self, study: optuna.Study) -> int:
        return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))

    def spent(self, study: optuna.Study) -> bool:
        return self.used(study) >= self._n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.spent(study):
            study.stop()


def this_worker(trial_number: int) -> dict:
    """The `worker` attribute of a running trial: who runs it (a retried trial inherits the old
    worker's attributes, hence the trial number)."""
    return {"trial": trial_number, "host": host_name(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(worker: dict) -> bool:
    if worker.get("host") != host_name():
        return True  # another machine: the heartbeat decides
    started = _start_time(int(worker.get("pid", -1)))
    return started is not None and started == worker.get("started")


def reclaim_dead_local_trials(study: optuna.Study, faults: FaultSpec) -> list[int]:
    """Fail and re-queue the running trials whose worker ran on this host and is gone (a rerun after
    a kill): the retry continues in the trial's folder from its last checkpoint. Returns their numbers."""
    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER) or {}
        if worker.get("trial") != trial.number or _alive(worker):
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took it over first
        retry_callback(faults)(study, study._storage.get_trial(trial._trial_id))
        reclaimed.append(trial.number)
        logger.info("trial %d: its worker (pid %s) is gone; queued again, it continues from its last checkpoint",
                    trial.number, worker.get("pid"))
    return reclaimed


def original_number(trial: FrozenTrial) -> int:
    """The trial whose folder this trial runs in: itself, or the first trial of its retry chain."""
    first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if first is None else int(first)


def find_duplicate(study: optuna.Study, trial: FrozenTrial) -> Optional[int]:
    """Another trial of the same configuration that is finished or runs with priority (a lower
    number), else None. A trial of its own retry chain is not a duplicate."""
    mine = original_number(trial)
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or original_number(other) == mine or other.params != trial.params:
            continue
        if other.user_attrs.get(DUPLICATE_OF) is not None:
            continue
        finished = other.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if finished or (other.state == TrialState.FAIL and other.user_attrs.get(CRASHED)):
            return other.number
        if other.state == TrialState.RUNNING and other.number < trial.number:
            return other.number
    return None
