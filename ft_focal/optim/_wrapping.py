"""The ``torch.optim.Optimizer`` side of every method: the wrapped base optimizer, the options, the
counters and ``state_dict``. The step itself is in _step.py.

Every optimizer of ``ft_focal.optim`` wraps a base optimizer (``self.param_groups is
self.base_optimizer.param_groups``, so LR schedulers built on the wrapper work) and applies it exactly
once per step, at the original weights w, with the method's gradient.

Common options:
  backward: function back-propagating a scalar, called as ``backward(loss, retain_graph=...,
    inputs=...)`` (default ``torch.Tensor.backward``; the training loop passes
    ``accelerator.backward`` - keep the accelerator's ``gradient_accumulation_steps`` at 1).
  scaler: a ``torch.amp.GradScaler`` (fp16). Each pass' gradients are unscaled before any norm is
    taken; a step whose loss or gradients are non-finite in ANY pass is skipped entirely (weights
    restored to w, base optimizer not applied, ``skipped_steps += 1``) and the scale is backed off;
    after ``growth_interval`` good steps it grows (GradScaler's own rule, on the device). Do not call
    ``scaler.step`` / ``scaler.update`` yourself. ``backward_applies_scaler=True`` when ``backward``
    scales the loss itself (``accelerator.backward`` under fp16 - then pass ``accelerator.scaler``);
    otherwise the optimizer calls ``scaler.scale(loss)``. Without a scaler a non-finite loss or
    gradient still skips the step.
  model: the trained ``nn.Module``. If given, running statistics of normalisation layers
    (BatchNorm ...) are saved before every perturbed forward and restored after it, so they equal the
    statistics after the first (unperturbed) forward only. Required by ``one_backward``.
  no_sync, sync_perturbation, sharded: distributed training. With ``torch.distributed`` initialised,
    world size > 1 and ``no_sync`` given (e.g. ``lambda: accelerator.no_sync(model)``) every pass
    runs under ``no_sync`` and the optimizer averages gradients itself: the perturbation gradient iff
    ``sync_perturbation`` (False = local perturbation per process, "m-sharpness"), the final
    gradient always. Without ``no_sync`` the model's own DDP hooks average every backward; methods
    that back-propagate one forward twice (all but ERM/SAM unless one_backward) then need
    ``no_sync``. ``sharded=True`` (FSDP / ZeRO: gradients are shards) makes every global norm
    ``sqrt(all_reduce(sum of local squares))``; ``no_sync`` is then ignored. FSDP2 parameters
    (DTensors from ``fully_shard``) are detected: the math then runs on each rank's local shard
    (perturbation, restore, split gradients, ASAM, CC-SAM norms) with the norms all-reduced over
    the shards' group, and the one-backward path is switched off with one log line
    (``_sharding.py``; docs/design.md, "Sharded training").
  one_backward, one_backward_check: Focal-SAM / ImbSAM / SSE-SAM only (one_backward/__init__.py).

With Accelerate call ``step`` on the optimizer itself (``accelerated_optimizer.optimizer``), not on
the ``AcceleratedOptimizer`` wrapper (it forwards no ``targets`` and, under fp16, would run its own
``scaler.step``); keep ``gradient_accumulation_steps=1`` and pass micro-batch lists instead.
"""
from __future__ import annotations

import logging
import warnings

import torch

from ._runtime import Runtime
from .one_backward import OneBackward

logger = logging.getLogger("ft_focal.optim")

COMMON_KWARGS = ("backward", "scaler", "backward_applies_scaler", "model", "no_sync",
                 "sync_perturbation", "sharded")

#: Optimizer keywords that were renamed: old -> new (the old name still works, with a DeprecationWarning).
RENAMED_KEYWORDS = {"single_backward": "one_backward", "single_backward_check": "one_backward_check"}


def _renamed_keywords(kwargs: dict, one_backward, one_backward_check) -> tuple:
    """(one_backward, one_backward_check), taking the old keyword names out of ``kwargs``."""
    values = {"one_backward": one_backward, "one_backward_check": one_backward_check}
    for old, new in RENAMED_KEYWORDS.items():
        if old in kwargs:
            warnings.warn(f"the optimizer keyword {old}= is now {new}=", DeprecationWarning, stacklevel=5)
            values[new] = kwargs.pop(old)
    return values["one_backward"], values["one_backward_check"]


def class_table(class_counts) -> torch.Tensor:
    """Training-set counts per class as a float64 tensor [C]; one-line ValueError when unusable."""
    counts = torch.as_tensor(list(class_counts) if class_counts is not None else [], dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError("class_counts must be a non-empty sequence of non-negative training-set counts")
    return counts


class WrappingOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` around ``base_optimizer_cls(params, **base_kwargs)`` (module docstring)."""

    def __init__(self, params, base_optimizer_cls, *, backward=None, scaler=None,
                 backward_applies_scaler=False, model=None, no_sync=None, sync_perturbation=True,
                 sharded=False, one_backward=False, one_backward_check=True, **base_kwargs):
        one_backward, one_backward_check = _renamed_keywords(base_kwargs, one_backward, one_backward_check)
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(f"base_optimizer_cls must be a torch.optim.Optimizer class, got {base_optimizer_cls!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self._link()
        if backward_applies_scaler and scaler is None:
            raise ValueError("backward_applies_scaler=True needs the scaler the backward uses (scaler=...)")
        self.runtime = Runtime(backward=backward if backward is not None else torch.Tensor.backward, scaler=scaler,
                               backward_applies_scaler=bool(backward_applies_scaler), model=model, no_sync=no_sync,
                               sync_perturbation=bool(sync_perturbation), sharded=bool(sharded))
        self._warned = set()
        self.one_backward = self._one_backward_strategy(one_backward, bool(one_backward_check), model)
        self.one_backward_check = bool(one_backward_check)
        self.skipped_steps = 0
        self.last_skipped: bool | torch.Tensor = False   # the last step's: a bool, or a 0-d device flag
        self._base_stepped = False   # the base optimizer has applied an update (its state exists)
        self.pass_counts = {"forward": 0, "backward": 0}
        self.last_pass_counts = {"forward": 0, "backward": 0}
        self.last_check_backwards = 0   # backwards of the last step that only checked the one-backward path
        self.epoch, self.num_epochs = 0, None
        self._pending_growth = None

    def _one_backward_strategy(self, one_backward, check: bool, model) -> OneBackward | None:
        """The one-backward strategy, its layers swapped now (before any compile), or None.

        "auto" keeps it iff every trainable parameter sits in a layer with a rule and none is sharded;
        otherwise the exact path, said once at INFO (not a warning: nothing was asked for that cannot
        be given)."""
        auto = isinstance(one_backward, str)
        if auto and one_backward != "auto":
            raise ValueError(f"one_backward must be True, False or 'auto', got {one_backward!r}")
        if one_backward is True and model is None:
            raise ValueError("one_backward=True needs model= (the nn.Module, for the layer rules)")
        if not one_backward or model is None:
            return None
        strategy = OneBackward(model)
        strategy.validated = not check
        params = self._trainable()
        reason = strategy.auto_off_reason(params) if auto else None
        if reason is not None:
            logger.info("one_backward='auto': off (%s); the exact path runs (same update, one more backward)",
                        reason)
            strategy.remove()
            return None
        strategy.use_this_step(params, self._warn_once)
        return strategy

    def _trainable(self) -> list:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ torch.optim plumbing
    def _link(self):
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group):
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
            self._link()
        else:
            super().add_param_group(param_group)

    def set_epoch(self, epoch: int, num_epochs: int | None = None):
        """Tell the optimizer the current (0-based) epoch; only SSE-SAM uses it."""
        self.epoch = int(epoch)
        if num_epochs is not None:
            self.num_epochs = int(num_epochs)

    def _extra_state(self):
        return {}

    def _load_extra_state(self, state):
        pass

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite values (a host read when some were counted on the device)."""
        if self._skipped_on_device is not None:
            self._skipped_count += int(self._skipped_on_device.sum())
            self._skipped_on_device = None
        return self._skipped_count

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_count, self._skipped_on_device = int(value), None

    def _growth_tracker(self):
        scaler = self.runtime.scaler
        tracker = getattr(scaler, "_growth_tracker", None) if scaler is not None else None
        if tracker is None:
            return int(self._pending_growth or 0)
        return int(tracker)   # a host read, at checkpoint time only

    def state_dict(self):
        sb = self.one_backward
        return {"base_optimizer": self.base_optimizer.state_dict(),
                "wrapper": {"skipped_steps": self.skipped_steps, "pass_counts": dict(self.pass_counts),
                            "epoch": self.epoch, "num_epochs": self.num_epochs,
                            "growth_tracker": self._growth_tracker(),
                            "one_backward_validated": sb.validated if sb else False,
                            "one_backward_disabled": sb.disabled if sb else None, **self._extra_state()}}

    def load_state_dict(self, state_dict):
        if "base_optimizer" not in state_dict:
            raise ValueError("not a state_dict of an ft_focal optimizer (no 'base_optimizer' entry)")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._link()   # load_state_dict replaces the base optimizer's param_groups / state objects
        w = state_dict.get("wrapper", {})
        self.skipped_steps = int(w.get("skipped_steps", 0))
        self.pass_counts = dict(w.get("pass_counts", {"forward": 0, "backward": 0}))
        self.epoch, self.num_epochs = int(w.get("epoch", 0)), w.get("num_epochs")
        self._pending_growth = int(w.get("growth_tracker", 0))
        self._base_stepped = bool(self.base_optimizer.state)
        if self.one_backward is not None:   # "sb_*": the names in checkpoints written before the rename
            validated = w.get("one_backward_validated", w.get("sb_validated", self.one_backward.validated))
            self.one_backward.validated = bool(validated)
            self.one_backward.disabled = w.get("one_backward_disabled", w.get("sb_disabled", self.one_backward.disabled))
        self._load_extra_state(w)

    def _warn_once(self, key, msg, *args, level=logging.WARNING):
        if key not in self._warned:
            self._warned.add(key)
            logger.log(level, msg, *args)

    def describe_last_passes(self) -> str:
        """The last step's passes as a person reads them: "2F + 3B (forward / backward passes over
        the batch; 1 backward of them was the one-time check of the one-backward path against the
        exact one, from now on 2F + 2B)"."""
        f, b = self.last_pass_counts.get("forward", 0), self.last_pass_counts.get("backward", 0)
        text = f"{f}F + {b}B (forward / backward passes over the batch"
        if self.last_check_backwards:
            text += (f"; {self.last_check_backwards} backward of them was the one-time check of the one-backward "
                     f"path against the exact one, from now on {f}F + {b - self.last_check_backwards}B")
        return text + ")"
