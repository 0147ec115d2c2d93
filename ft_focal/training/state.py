"""The loop's state between updates, as a checkpoint's trainer.json records it, and the run-level files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ft_focal.config import Recipe
from ft_focal.training import checkpoint as ckpt

BEST = "best_model.safetensors"  # in output_dir: trainable tensors of the best epoch on validation
# Recipe keys that do not change what a run computes: a resumed run may change them freely.
OPERATIONAL_KEYS = (("data", "num_workers"), ("train", "threads"), ("train", "keep_checkpoints"),
                    ("train", "save_every_steps"), ("train", "log_every_steps"), ("train", "eval_batch_size"),
                    ("train", "max_bad_steps"), ("train", "log_with"))


@dataclass
class TrainState:
    """What a checkpoint's trainer.json holds besides tensors (field order = the file's key order)."""

    step: int = 0                       # updates done
    best: Optional[float] = None        # best validation score so far
    best_epoch: Optional[int] = None
    best_sha256: Optional[str] = None   # of best_model.safetensors (checked before it is used)
    history: list = field(default_factory=list)  # one entry per validation
    bad_streak: int = 0                 # consecutive skipped (non-finite) updates
    bad_images: int = 0                 # unreadable training image files skipped (data.skip_bad_images)
    bad_image_indices: list = field(default_factory=list)  # which ones (not logged nor counted again)
    epoch_end_step: int = 0             # update at which the last epoch end ran (it runs once)
    train_seconds: float = 0.0          # across resumes
    recipe_sha256: Optional[str] = None

    @classmethod
    def from_json(cls, raw: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def save_best(out: Path, model: torch.nn.Module) -> str:
    """Write best_model.safetensors atomically; returns its sha256 (recorded in the checkpoint)."""
    from ft_focal.files import save_safetensors

    tmp = out / (BEST + ".tmp")
    save_safetensors(ckpt.trainable_state(model), tmp)
    digest = ckpt.sha256(tmp)
    os.replace(tmp, out / BEST)
    return digest


def recipe_digest(recipe: Recipe) -> str:
    """sha256 of the resolved recipe without where it is written (a resumed run must match it)."""
    raw = dataclasses.asdict(recipe)
    raw.pop("output_dir", None)
    raw.pop("hub", None)
    for section, key in OPERATIONAL_KEYS:
        raw[section].pop(key, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


class SkipStreak:
    """Consecutive skipped (non-finite) updates. A step's skip is a bool, or a 0-d device flag when
    the base optimizer skips on the device (fused kernel): then the streak is kept on the device
    and read only when asked (`read`: at log steps and checkpoints), not once per update."""

    def __init__(self, current: int = 0) -> None:
        self.current = current   # host view of the streak now
        self.longest = 0         # the longest streak reached since the last read (in this process)
        self._pending: Optional[torch.Tensor] = None   # device [current, longest] not yet read

    def add(self, skipped: "bool | torch.Tensor") -> None:
        pair = self._pending
        if not isinstance(skipped, torch.Tensor):
            if pair is None:
                self.current = self.current + 1 if skipped else 0
                self.longest = max(self.longest, self.current)
                return
            skipped = pair.new_full((), float(skipped))
        if pair is None:   # filled by kernels: torch.tensor(..., device=cuda) would copy and sync
            pair = torch.stack([skipped.new_full((), float(self.current)), skipped.new_full((), float(self.longest))])
        current = (pair[0] + 1) * skipped
        self._pending = torch.stack([current, torch.maximum(pair[1], current)])

    @property
    def on_device(self) -> bool:
        return self._pending is not None

    def read(self) -> tuple[int, int]:
        """(current, longest since the previous read): one host read if counted on the device."""
        if self._pending is not None:
            self.current, self.longest = (int(v) for v in self._pending.unbind())   # one sync
            self._pending = None
        longest, self.longest = self.longest, self.current
        return self.current, longest
