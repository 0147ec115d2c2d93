"""Atomic, verifiable training checkpoints.

Layout: `output_dir/checkpoints/step_00000120/` holding
  model.safetensors        trainable parameters and buffers (the frozen backbone is rebuilt
                           from the recipe, so it is not duplicated in every checkpoint)
  optimizer.pt             optimizer state incl. the SAM-family wrapper and the base optimizer
  scheduler.pt             LR scheduler state
  scaler.pt                GradScaler state (fp16 only)
  rng_rank{r}.pt           RNG states of process r (torch, numpy, python, cuda)
  trainer.json             epoch / step / best metric / history / counters
  best_model.safetensors   the run's best model on validation so far (when there is one;
                           hard-linked from output_dir, restored from here on resume)
  MANIFEST.json            sha256 of every file above; written last = completeness marker

A checkpoint is first written to `step_N.tmp/` (every file fsync'ed) and renamed when complete,
so a kill at any moment leaves either the previous good checkpoint or a stray `.tmp` directory
(ignored and removed). A good checkpoint is never overwritten: a second checkpoint of the same
step (e.g. the epoch-end one after a resume) gets the name `step_N.1`, `step_N.2`, ... and
sorts after it. `latest_good` skips (with a warning) checkpoints that are incomplete or whose
files do not match their MANIFEST; `prune` keeps the newest `keep` GOOD ones and deletes
only checkpoints older than a newer one that verifies: it never deletes the only good checkpoint,
nor one (corrupt or not) that no verified checkpoint supersedes. `.pt` files hold only tensors and plain containers and are
read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from ft_focal.files import save_safetensors, write_json

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer.json")
# a sharded (train.fsdp) checkpoint: torch.distributed.checkpoint's files (ft_focal/training/fsdp.py)
REQUIRED_SHARDED = (".metadata", "optimizer_wrapper.pt", "scheduler.pt", "trainer.json")
_NAME = re.compile(r"^step_(\d+)(?:\.(\d+))?$")  # step_00000120 or step_00000120.1 (same step, later)


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoint_step(path: Path) -> int:
    """The update count a checkpoint directory was written at."""
    return _order(Path(path))[0]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain_rng(state: dict[str, Any]) -> dict[str, Any]:
    """numpy / python RNG states as tensors and lists so weights_only loading accepts them."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    py_version, py_state, py_gauss = state["python"]
    plain = {
        "torch": state["torch"],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if "cuda" in state:
        plain["cuda"] = state["cuda"]
    return plain


def _from_plain_rng(plain: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = plain["numpy"]
    py_version, py_state, py_gauss = plain["python"]
    state = {
        "torch": plain["torch"],
        "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (py_version, tuple(py_state), py_gauss),
    }
    if "cuda" in plain:
        state["cuda"] = plain["cuda"]
    return state


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers, detached, contiguous, on the CPU."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            state[name] = param.detach().cpu().contiguous().clone()
    for name, buf in model.named_buffers():
        state[name] = buf.detach().cpu().contiguous().clone()
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state`) into the model. KeyError, one line naming the tensors,
    when the state holds a tensor the model lacks or lacks a TRAINABLE tensor of the model: a
    missing one would silently keep its initial value and the run would not continue the saved one."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unexpected = [name for name in state if name not in own]
    if unexpected:
        raise KeyError(f"checkpoint has tensors the model does not: {_names(unexpected)}")
    absent = [name for name, p in model.named_parameters() if p.requires_grad and name not in state]
    if absent:
        raise KeyError(f"checkpoint lacks trainable tensors of the model: {_names(absent)}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoint directories (complete or not; `.tmp` ones excluded), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=_order)


def verify(path: Path) -> Optional[str]:
    """None when `path` is a complete, uncorrupted checkpoint, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "incomplete (no MANIFEST.json)"
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "MANIFEST.json is unreadable"
    if not isinstance(expected, dict):
        return "MANIFEST.json is not a mapping of file names to sha256"
    required = REQUIRED_SHARDED if ".metadata" in expected else REQUIRED
    absent = [name for name in required if name not in expected]
    if absent:
        return f"MANIFEST.json does not list {absent[0]}"
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if sha256(file) != digest:
            return f"checksum mismatch in {name}"
    return None


def latest_good(root: Path) -> Optional[Path]:
    """The newest checkpoint that verifies; older ones are tried (with a warning) when newer ones
    are incomplete or corrupt."""
    for path in reversed(checkpoint_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
    return None


def _target(root: Path, step: int) -> Path:
    """`step_N`, or `step_N.k` when a checkpoint of this step exists already (never overwritten)."""
    final = root / f"step_{step:08d}"
    serial = 0
    while final.exists():
        serial += 1
        final = root / f"step_{step:08d}.{serial}"
    return final


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], Any] = lambda: None,
    keep: int = 2,
    scaler: Any = None,
    files: Optional[dict[str, Path]] = None,
) -> Path:
    """Write a checkpoint atomically; every process writes its RNG state, rank 0 the rest.

    `barrier` synchronises processes (accelerator.wait_for_everyone) so that rank 0 renames the
    directory only after every process has written into it. `scaler`: the fp16 GradScaler.
    `files`: other files to include, name -> path (hard-linked when the filesystem allows it,
    else copied; e.g. the run's best_model.safetensors, so a checkpoint is self-contained).
    Returns the checkpoint directory (on rank 0; other ranks get the temporary name's target).
    """
    root = Path(root)
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rng_file = tmp / f"rng_rank{rank}.pt"
    torch.save(_plain_rng(rng_state()), rng_file)
    _fsync_file(rng_file)
    if rank == 0:
        save_safetensors(trainable_state(model), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        write_json(tmp / "trainer.json", {**trainer_state, "world_size": world_size})
        for name, source in (files or {}).items():
            try:
                os.link(source, tmp / name)
            except OSError:
                shutil.copy2(source, tmp / name)
    barrier()
    final = tmp
    if rank == 0:
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync_file(tmp / name)
        manifest = {name: sha256(tmp / name) for name in files}
        write_json(tmp / MANIFEST, manifest, fsync=True)
        _fsync_dir(tmp)
        final = _target(root, step)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep)
    barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` GOOD checkpoints and drop stray `.tmp` directories. A checkpoint is
    deleted only when it is older than a newer one that verifies: an unverifiable checkpoint with
    no good one after it stays (its weights may be all the user has)."""
    for stray in root.glob("step_*.tmp"):
        shutil.rmtree(stray, ignore_errors=True)
    dirs = checkpoint_dirs(root)
    good = [p for p in dirs if verify(p) is None]
    if not good:
        return
    keep_set = set(good[-max(keep, 1):])  # the newest good one is always kept
    newest_good = _order(good[-1])
    for path in dirs:
        if path not in keep_set and _order(path) < newest_good:
            shutil.rmtree(path, ignore_errors=True)


def unusable_report(root: Path) -> list[str]:
    """One line per checkpoint directory under `root`: its name and what is wrong with it
    (`verify`), noting whether its model weights still match the manifest."""
    lines = []
    for path in checkpoint_dirs(root):
        problem = verify(path)
        if problem is None:
            continue
        lines.append(f"{path}: {problem}{_weights_note(path)}")
    return lines


def _weights_note(path: Path) -> str:
    try:
        digest = json.loads((path / MANIFEST).read_text()).get("model.safetensors")
        intact = digest is not None and (path / "model.safetensors").is_file() and \
            sha256(path / "model.safetensors") == digest
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""
    return " (its model.safetensors is intact)" if intact else ""


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    scaler: Any = None,
) -> dict:
    """Restore everything saved by `save_checkpoint`; returns the trainer state.

    RNG states are restored last, so whatever building the objects drew from the generators
    does not matter: the run continues with the exact streams it had when it was saved.
    """
    path = Path(path)
    load_trainable_state(model, load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None:
        if (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        else:
            logger.warning("%s has no GradScaler state (saved without fp16?); the loss scale starts afresh", path)
    trainer = json.loads((path / "trainer.json").read_text())
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_from_plain_rng(torch.load(rng_file, weights_only=True)))
    else:
        logger.warning("%s has no RNG state for process %d (different world size?)", path, rank)
    return trainer
