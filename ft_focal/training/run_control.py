"""How a run starts, continues and stops without losing work (the Trainer's policy; ft_focal/training/trainer.py).

* Resume or refuse: when checkpoints exist and none verifies, the run stops (one logged line per
  checkpoint saying what is wrong, then one error line saying how to go on) instead of starting
  from update 0 next to them (`refuse_unverifiable`).
* Starting over is explicit: `--restart` moves the old checkpoints (and the best model so far)
  into `output_dir/previous_<UTC time>/` and says where; nothing is deleted (`move_aside`).
* "The recipe differs": the keys that differ from the checkpoint's recipe, old and new value
  (`flat_recipe`, `recipe_changes`).
* Preemption: SIGTERM / SIGUSR1 (SLURM, spot instances) set a flag; the loop writes a checkpoint
  at the end of the current update and exits with `PREEMPTED_EXIT_CODE` (`StopSignals`, `Preempted`).
  Running the same command again resumes from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle  # only for the exception type raised by torch.load(weights_only=True)
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ft_focal.config import Recipe
from ft_focal.errors import UserError, one_line
from ft_focal.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry" - what a
# preempted run is. Distinct from 0 (done), 1 (crash), 2 (user error), 130 (Ctrl-C).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_SKIPPED_KEYS = ("output_dir", "hub")   # where a run is written or pushed: not what it computes


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; `str()` is the line for the user."""


class StopSignals:
    """SIGTERM / SIGUSR1 handlers that only record the signal (the loop acts at a safe point).

    `install()` in the main thread (a no-op elsewhere, where Python cannot install handlers),
    `restore()` puts the previous handlers back; `received` is the signal's name or None.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> None:
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is None:   # pragma: no cover - e.g. SIGUSR1 on Windows
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:   # not the main thread
                return

    def agreed(self, accelerator: Any, agreed_point: bool) -> Optional[str]:
        """The signal to stop on now, or None. One process: the flag as it is. Several: they agree
        with one collective (max of the flags) at `agreed_point`s only - log steps and checkpoints,
        the same updates in every process - so that all of them stop at the same update."""
        if accelerator.num_processes == 1:
            return self.received
        if not agreed_point:
            return None
        import torch

        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        if float(accelerator.reduce(flag, "max").item()) == 0.0:
            return None
        return self.received or "a signal to another process"

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def load_for_resume(path: Path, load: Callable[[], dict]) -> dict:
    """`load()` (the checkpoint at `path` into the run: plain or FSDP2-sharded), with one line for a
    checkpoint that does not fit the recipe or holds more than tensors (refused by
    torch.load(weights_only=True))."""
    try:
        return load()
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it references {found.group(1)}" if found else one_line(exc, 120)
        raise UserError(f"{path}: refusing to load a checkpoint file that holds more than tensors "
                        f"({what}); remove this checkpoint") from None
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"{path}: cannot resume from this checkpoint ({one_line(exc)}); it does not "
                        f"fit this recipe or holds more than tensors: use another output_dir or remove it") from None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM / SIGUSR1 (SLURM signals every process of
    a job step), so the main process can finish its update and write the checkpoint; it ends them."""
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


def refuse_unverifiable(ckpt_root: Path) -> None:
    """Stop when `ckpt_root` holds checkpoints and none verifies: log one line per checkpoint
    (what is wrong, whether its weights are intact), then raise one UserError saying how to go on."""
    lines = ckpt.unusable_report(ckpt_root)
    if not lines:
        return
    for line in lines:
        logger.error("unusable checkpoint %s", line)
    raise UserError(
        f"{ckpt_root}: {len(lines)} checkpoint(s) and none verifies (listed above); nothing was started or deleted. "
        "To keep them and start from update 0, run the same command with --restart (they are moved aside, "
        "not deleted); to continue this run instead, restore a good copy of a checkpoint folder there")


def restart_aside(out: Path, names: tuple[str, ...], accelerator: Any) -> None:
    """`--restart`: the main process moves the previous checkpoints aside (`move_aside`) and says where."""
    if accelerator.is_main_process:
        moved = move_aside(out, names)
        logger.info("--restart: starting from update 0; %s", f"the previous checkpoints are in {moved}"
                    if moved else "there were no previous checkpoints")
    accelerator.wait_for_everyone()


def stuck_message(step: int, longest: int, limit: int, ckpt_root: Path, lr: float) -> str:
    """The line that stops a run after `limit` consecutive non-finite updates, with the way on that
    works: resuming would restore the old learning rate (optimizer and schedule state) and weights
    that already diverge, so it is a fresh start with a lower one, the old checkpoints kept aside."""
    return (f"training stopped at update {step}: {longest} consecutive updates had non-finite loss or gradients "
            f"(limit 'train.max_bad_steps' = {limit}); the last good weights are saved in {ckpt_root}. Running "
            f"again as is resumes there and stops again: start over with a lower learning rate, adding "
            f"optim.lr={lr / 10:g} --restart (or change 'train.mixed_precision'); --restart moves these "
            f"checkpoints aside, it does not delete them")


def warn_recipe_differs(path: Path, recorded: Optional[dict], recipe: Recipe, ignore: tuple[str, ...]) -> None:
    """Warn that `recipe` is not the one checkpoint `path` was written with, naming each key
    that differs with its old and new value (`recorded`: the checkpoint's flat recipe, if any)."""
    changes = recipe_changes(recorded, flat_recipe(recipe), ignore) if recorded else \
        ["which keys: not recorded in this checkpoint"]
    logger.warning("the recipe differs from the one %s was written with (%s): the resumed run is not the run this "
                   "recipe describes from scratch", path, "; ".join(changes))


def move_aside(out: Path, names: tuple[str, ...]) -> Optional[Path]:
    """Move `out/<name>` for each existing name into a new `out/previous_<UTC time>/`; returns
    that folder (None when there was nothing to move). Nothing is deleted."""
    present = [out / name for name in names if (out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out / f"previous_{stamp}"
    serial = 0
    while target.exists():
        serial += 1
        target = out / f"previous_{stamp}.{serial}"
    target.mkdir(parents=True)
    for path in present:
        os.replace(path, target / path.name)
    return target


def flat_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as dotted key -> JSON value, without where it is written (output_dir, hub)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    raw = dataclasses.asdict(recipe)
    for key in _SKIPPED_KEYS:
        raw.pop(key, None)
    walk("", json.loads(json.dumps(raw, default=str)))   # as trainer.json will hold it
    return flat


def recipe_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (or exists on one side only),
    leaving out `ignore` (keys a resumed run may change freely)."""
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            shown = ["(absent)" if v is missing else repr(v) for v in (before, after)]
            changes.append(f"{key}: {shown[0]} -> {shown[1]}")
    return changes


def warn_if_run_differs(path: Path, restored: dict, recipe: Any, digest: str, world: int,
                        operational: tuple[str, ...]) -> None:
    """Warnings for a resume from `path` by another recipe (key by key) or another process count."""
    if restored.get("recipe_sha256") not in (None, digest):
        warn_recipe_differs(path, restored.get("recipe"), recipe, operational)
    if restored.get("world_size", world) != world:
        logger.warning("%s was written by %s process(es), this run has %d", path, restored.get("world_size"), world)


def restore_file(saved: Path, target: Path) -> None:
    """Atomically put a checkpoint's copy of a file (e.g. the best model) back in place, if it has one."""
    if saved.is_file():
        shutil.copyfile(saved, target.with_name(target.name + ".tmp"))
        os.replace(target.with_name(target.name + ".tmp"), target)
