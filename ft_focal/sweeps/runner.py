"""One sweep trial = one normal run per seed, each in a fresh subprocess, in the trial's folder
`<sweep>/trials/trial_NNNN/seed_S` (its own checkpoints, train_log.jsonl, report.md, final/).

A fresh process per run carries no RNG, thread, allocator or logging state from one trial to the
next, and the run is exactly `ft-focal train <folder>/recipe.yaml` (or the `--launch` prefix, e.g.
`accelerate launch --config_file ...`, for a trial over several GPUs). The run reports its
validation objective after each epoch-end evaluation (ft_focal/sweeps/pruning.py). A rerun of the
same folder resumes from its newest checkpoint, which is how a retried trial continues.
The objective is the mean over seeds of the chosen validation metric; the test metrics are stored
for the report and never used to rank.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import optuna

from ft_focal.config import save_recipe
from ft_focal.errors import UserError, one_line
from ft_focal.sweeps.objective import objective_value
from ft_focal.sweeps.pruning import PRUNED_MARKER, TRIAL_ENV
from ft_focal.sweeps.spec import ParamSpec, SweepSpec
from ft_focal.sweeps.study import CRASHED, DUPLICATE_OF, INTERRUPTED, WORKER, find_duplicate, original_number, this_worker

logger = logging.getLogger(__name__)

METRIC_KEYS = ("overall", "many", "medium", "few")


class TrialCrashed(Exception):
    """The run failed (bad value, non-finite stop, crash): the trial is FAIL with this one-line reason."""


class TrialInterrupted(Exception):
    """The sweep's --timeout stopped the run: the trial is FAIL and queued again (it resumes)."""


def suggest(trial: optuna.Trial, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.key, param.choices)
    if param.type == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1))
    return trial.suggest_float(param.key, float(param.low), float(param.high), log=param.type == "log_float",
                               step=None if param.step is None else float(param.step))


def trial_folder(spec: SweepSpec, number: int) -> Path:
    return Path(spec.output_dir) / "trials" / f"trial_{number:04d}"


class TrialRunner:
    """The Optuna objective. `launch`: the command prefix of a run (default: this Python, -m
    ft_focal.train); `gpu`: CUDA_VISIBLE_DEVICES of its runs; `deadline`: time.time() at which a
    running trial is stopped (--timeout)."""

    def __init__(self, spec: SweepSpec, storage_url: str, launch: Optional[str] = None, gpu: Optional[str] = None,
                 deadline: Optional[float] = None) -> None:
        self.spec, self.storage_url, self.gpu, self.deadline = spec, storage_url, gpu, deadline
        self.launch = shlex.split(launch) + ["-m", "ft_focal.train"] if launch else [sys.executable, "-m", "ft_focal.train"]

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        params = {p.key: suggest(trial, p) for p in spec.space}
        for attr in (CRASHED, INTERRUPTED, DUPLICATE_OF):  # a retry inherits the failed trial's attributes
            trial.set_user_attr(attr, None)
        trial.set_user_attr(WORKER, this_worker(trial.number))
        frozen = trial.study._storage.get_trial(trial._trial_id)
        duplicate = find_duplicate(trial.study, frozen)
        if duplicate is not None:
            trial.set_user_attr(DUPLICATE_OF, duplicate)
            logger.info("trial %d: same configuration as trial %d, skipped", trial.number, duplicate)
            raise optuna.TrialPruned(f"duplicate of trial {duplicate}")
        folder = trial_folder(spec, original_number(frozen))
        trial.set_user_attr("folder", str(folder))
        start = time.time()
        retried = "" if original_number(frozen) == trial.number else f" (retry of trial {original_number(frozen)})"
        logger.info("trial %d started%s: %s -> %s", trial.number, retried, _format_params(params), folder)
        results = []
        for index, seed in enumerate(spec.seeds):
            results.append(self._run_seed(trial, params, seed, index, folder / f"seed_{seed}", start))
        val = _mean_metrics([r.get("val") or {} for r in results])
        test = _mean_metrics([r.get("test") or {} for r in results])
        trial.set_user_attr("val", val)
        trial.set_user_attr("test", test)
        trial.set_user_attr("seconds", round(time.time() - start, 1))
        value = objective_value(val, spec.objective)
        if value is None:
            raise self._crash(trial, f"the validation split has no images of a group the objective "
                                     f"'{spec.objective}' needs")
        return value

    def _run_seed(self, trial: optuna.Trial, params: dict, seed: int, index: int, run_dir: Path, start: float) -> dict:
        spec = self.spec
        try:
            # named after the folder, not the trial number: a retry resumes the same recipe
            recipe = spec.trial_recipe(params, seed, str(run_dir), f"{spec.name}_{run_dir.parent.name}_seed{seed}")
        except UserError as exc:
            raise self._crash(trial, str(exc)) from None
        save_recipe(recipe, run_dir / "recipe.yaml")
        marker = run_dir / PRUNED_MARKER
        marker.unlink(missing_ok=True)
        epochs_per_seed = max(1, recipe.train.epochs)
        env = dict(os.environ)
        env[TRIAL_ENV] = json.dumps({"storage": self.storage_url, "study": spec.name, "trial_id": trial._trial_id,
                                     "objective": spec.objective, "step_offset": index * epochs_per_seed,
                                     "pruner": vars(spec.pruner)})
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        returncode = self._run_child(trial, self.launch + [str(run_dir / "recipe.yaml")], env, run_dir)
        if marker.is_file():
            pruned = json.loads(marker.read_text())
            trial.set_user_attr("pruned_at_epoch", pruned.get("epoch"))
            trial.set_user_attr("seconds", round(time.time() - start, 1))
            raise optuna.TrialPruned(f"pruned after epoch {pruned.get('epoch')} (seed {seed})")
        if returncode != 0:
            raise self._crash(trial, f"seed {seed}: {_error_line(run_dir / 'train.out')} (exit code {returncode}; "
                                     f"log: {run_dir / 'train.out'})")
        try:
            return json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError) as exc:
            raise self._crash(trial, f"seed {seed}: no readable metrics.json ({one_line(exc)})") from None

    def _run_child(self, trial: optuna.Trial, command: list[str], env: dict, run_dir: Path) -> int:
        """The run as a child process (its output in run_dir/train.out); it dies with this worker."""
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.out", "ab") as out:
            child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            while True:
                try:
                    return child.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                if self.deadline is not None and time.time() > self.deadline:
                    _stop(child)
                    trial.set_user_attr(INTERRUPTED, "stopped by --timeout")
                    raise TrialInterrupted(f"trial {trial.number} stopped by --timeout; rerun the sweep to continue it "
                                           f"from its last checkpoint in {run_dir}")

    def _crash(self, trial: optuna.Trial, reason: str) -> TrialCrashed:
        reason = one_line(reason, 300)
        trial.set_user_attr(CRASHED, reason)
        return TrialCrashed(reason)


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the worker dies, so a killed worker leaves no orphan run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _error_line(log: Path) -> str:
    """The run's one-line error (`error: ...` from ft_focal's commands), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "the run failed"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "the run failed"))


def _mean_metrics(results: list[dict]) -> dict:
    """Per-metric mean over seeds (fractions); None where a seed has none."""
    out = {}
    for key in METRIC_KEYS:
        values = [r.get(key) for r in results]
        out[key] = None if not values or any(v is None for v in values) else float(sum(values) / len(values))
    return out


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
