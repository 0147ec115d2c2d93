"""Shared machinery of the sharpness-aware optimizers: one ``step(closure, targets)`` per step.

Every optimizer of ``ft_focal.optim`` is a ``torch.optim.Optimizer`` wrapping a base optimizer
(``self.param_groups is self.base_optimizer.param_groups``, so LR schedulers built on the wrapper
work). ``step`` runs every forward / backward pass the method needs and applies the base optimizer
exactly once, at the original weights w, with the method's gradient. Everything one step needs is in
a ``StepState`` passed explicitly; a method's ``_compute(st, passes)`` runs its forward / backward
passes through the ``Passes`` object it is handed (_passes.py, over the optimizer's ``Runtime``: how
the host back-propagates); the numerics are plain functions (numerics.py); the one-backward path is a
strategy object the optimizer owns (one_backward/__init__.py).

Closure contract: ``closure()`` runs the forward pass at the CURRENT weights and returns per-sample
losses ``[B]`` (``reduction='none'``); ``targets`` are the labels ``[B]``. ERM and SAM also accept a
0-d (already averaged) loss. Existing ``.grad`` values are ignored and cleared; after a successful
step ``p.grad`` holds the gradient the base optimizer used. Keep every trainable parameter of the
model in the optimizer (others would accumulate gradients from every pass).

Host reads: a steady-state step reads ONE device value on the host, the non-finite flag that decides
whether the base optimizer runs, and NONE when the base optimizer is fused (``fused=True``: SGD,
Adam, AdamW): its kernel takes the flag as ``found_inf`` and skips the update on the device, as
under ``GradScaler``, so the host never waits for the GPU and queues the next step while this one
runs. ``last_skipped`` is then a 0-d device tensor and ``skipped_steps`` is read when asked (log
steps, checkpoints). The first applied update still reads the flag: a fused SGD step skipped on its
first call would leave its momentum buffers uninitialised (torch creates them empty). Norms,
perturbation scales and the loss scale stay on the device; labels are checked against
``class_counts`` on the first step only (the training loop checks every label of a dataset once).
CC-SAM needs the batch's classes on the host (its passes are per class); ImbSAM / SSE-SAM skip the
pass of a group absent from the batch only when the labels are on the CPU (there reading them is
free), and otherwise run it with zero weights (same update).

Gradient accumulation (exact big-batch semantics): pass lists ``closures=[c1, c2, ...]`` and
``targets=[y1, y2, ...]``. Every pass loops over the micro-batches, one forward and one graph at a
time, and accumulates; every per-sample loss is divided by the TOTAL batch size ``sum_i B_i``, and
norms / perturbations are computed once per pass from the accumulated gradient, so the update is the
method's update on the concatenated batch. ``pass_counts`` counts passes over the whole batch.

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

With Accelerate call ``step`` on the optimizer itself (``accelerated_optimizer.optimizer``), not on
the ``AcceleratedOptimizer`` wrapper (it forwards no ``targets`` and, under fp16, would run its own
``scaler.step``); keep ``gradient_accumulation_steps=1`` and pass micro-batch lists instead.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import numerics as nm
from ._passes import Passes, Runtime
from ._sharding import as_param_grad, is_sharded, local_weights, shard_group
from .one_backward import OneBackward

logger = logging.getLogger(__name__)

COMMON_KWARGS = ("backward", "scaler", "backward_applies_scaler", "model", "no_sync",
                 "sync_perturbation", "sharded")


@dataclass
class StepState:
    """Everything one ``step`` needs, built by ``_begin`` and dropped at the end of the step."""
    micro_batches: list            # [(closure, targets [B_i] or None)]
    sizes: list                    # B_i per micro-batch (None: unknown until the closure runs)
    batch_size: float | None       # sum of B_i: the denominator of every weighted loss
    params: list                   # trainable parameters, the order of every gradient list
    weights: list                  # their detached local values (FSDP2: this rank's shard views)
    device: torch.device
    world: int                     # processes
    manual_sync: bool              # passes run under no_sync; the optimizer averages gradients
    can_skip: bool                 # a pass may skip a micro-batch (False under plain DDP)
    one_backward: bool          # the one-backward strategy is active this step
    norm_world: int                # > 1: norms sum their squares over the ranks of norm_group
    norm_group: object             # process group of the shards (None: the default group)
    inv_scale: dict                # device -> 1 / loss scale (float32 0-d)
    found: dict = field(default_factory=dict)      # device -> non-finite counter
    loss_sum: torch.Tensor | None = None           # sum of the per-sample losses at w
    passes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    backup: dict = field(default_factory=dict)     # param index -> w (perturbed ones)
    check_backwards: int = 0                       # backwards that only checked the one-backward path


#: Optimizer keywords that were renamed: old -> new (the old name still works, with a DeprecationWarning).
RENAMED_KEYWORDS = {"single_backward": "one_backward", "single_backward_check": "one_backward_check"}


def _renamed_keywords(kwargs: dict, one_backward, one_backward_check) -> tuple:
    """(one_backward, one_backward_check), taking the old keyword names out of ``kwargs``."""
    values = {"one_backward": one_backward, "one_backward_check": one_backward_check}
    for old, new in RENAMED_KEYWORDS.items():
        if old in kwargs:
            warnings.warn(f"the optimizer keyword {old}= is now {new}=", DeprecationWarning, stacklevel=4)
            values[new] = kwargs.pop(old)
    return values["one_backward"], values["one_backward_check"]


def class_table(class_counts):
    counts = torch.as_tensor(list(class_counts) if class_counts is not None else [], dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError("class_counts must be a non-empty sequence of non-negative training-set counts")
    return counts


class SharpnessOptimizer(torch.optim.Optimizer):
    method_kwargs: tuple = ()     # method keywords (registry / config validation)
    allow_scalar_loss = False     # ERM / SAM accept a 0-d (mean) loss and no targets
    multi_backward = True         # back-propagates one forward graph more than once

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
        auto = isinstance(one_backward, str)
        if auto and one_backward != "auto":
            raise ValueError(f"one_backward must be True, False or 'auto', got {one_backward!r}")
        if one_backward is True and model is None:
            raise ValueError("one_backward=True needs model= (the nn.Module, for the layer rules)")
        self.one_backward = OneBackward(model) if one_backward and model is not None else None
        self.passes = Passes(self.runtime, type(self).__name__, self.allow_scalar_loss, self.one_backward,
                             self._warn_once)
        self.one_backward_check = bool(one_backward_check)
        if self.one_backward is not None:
            self.one_backward.validated = not self.one_backward_check
            if auto:
                self._decide_one_backward(self._trainable())
            if self.one_backward is not None:
                self._plan_one_backward(self._trainable())   # swap the layers now, before any compile
        self.skipped_steps = 0
        self.last_skipped: bool | torch.Tensor = False   # the last step's: a bool, or a 0-d device flag
        self._base_stepped = False   # the base optimizer has applied an update (its state exists)
        self.pass_counts = {"forward": 0, "backward": 0}
        self.last_pass_counts = {"forward": 0, "backward": 0}
        self.last_check_backwards = 0   # backwards of the last step that only checked the one-backward path
        self.epoch, self.num_epochs = 0, None
        self._pending_growth = None
        self._labels_checked = False
        self._tables = {}

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

    def skips_on_device(self) -> bool:
        """True when the next step decides on the device whether to apply the update (fused base
        optimizer, after its first applied update): no host read."""
        base = self.base_optimizer
        return (self._base_stepped and getattr(base, "_step_supports_amp_scaling", False)
                and all(g.get("fused") for g in base.param_groups))

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

    # ------------------------------------------------------------------ the step
    def _compute(self, st: StepState, passes: Passes) -> list:
        """Run the method's passes (``passes``: _passes.py); return the final gradient list (aligned
        with st.params)."""
        raise NotImplementedError

    def step(self, closure=None, targets=None, *, closures=None):
        """Run every pass of the method and apply the base optimizer once; returns the mean loss
        at w (detached). ``closure`` may also be a list of micro-batch closures."""
        st = self._begin(closures if closures is not None else closure, targets)
        self.last_check_backwards = 0
        on_device = self.skips_on_device()
        try:
            final = self._compute(st, self.passes)
            if st.manual_sync:
                final = nm.all_reduce_mean(final, st.params, st.world)
            found = nm.any_found(st.found, st.device, st.world)
            skip = (found > 0).float() if on_device else bool(found > 0)   # the step's one host read
        finally:
            nm.restore_(st.weights, st.backup)
            self._zero_param_grads()
            if self.one_backward is not None:
                self.one_backward.reset()
        self.last_skipped = skip
        if on_device or not skip:
            for p, g in zip(st.params, final, strict=True):
                p.grad = g if g is None else as_param_grad(p, g)
            if on_device:
                self._base_step_unless(skip)
            else:
                self.base_optimizer.step()
                self._base_stepped = True
        else:
            self.skipped_steps += 1
        self.last_check_backwards = st.check_backwards
        self.last_pass_counts = dict(st.passes)
        for k, v in st.passes.items():
            self.pass_counts[k] += v
        if st.inv_scale and self.runtime.scaler is not None:
            nm.update_scale(self.runtime.scaler, found)
        self._labels_checked = True
        loss = st.loss_sum / st.batch_size if st.loss_sum is not None else torch.tensor(float("nan"))
        return loss.detach()

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

    def _base_step_unless(self, skip: torch.Tensor) -> None:
        """The fused base step, skipped by its own kernel where ``skip`` (float 0-d) is 1."""
        base = self.base_optimizer
        base.grad_scale, base.found_inf = None, skip   # GradScaler's protocol (gradients already unscaled)
        try:
            base.step()
        finally:
            del base.grad_scale, base.found_inf
        pending = self._skipped_on_device
        self._skipped_on_device = skip if pending is None else pending + skip

    def _trainable(self):
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _micro_batches(self, closures, targets) -> tuple[list, list]:
        """step()'s closures / targets as two lists of equal length, one entry per micro-batch."""
        if closures is None:
            raise ValueError("step() needs a closure returning per-sample losses (or closures=[...])")
        if callable(closures):
            closures, targets = [closures], [targets]
        closures = list(closures)
        if targets is None:
            targets = [None] * len(closures)
        elif isinstance(targets, torch.Tensor):
            targets = [targets]
        targets = list(targets)
        if len(targets) != len(closures):
            raise ValueError(f"got {len(closures)} closures but {len(targets)} targets")
        if any(t is None for t in targets):
            if len(closures) > 1:
                raise ValueError("micro-batch lists need targets=[y1, y2, ...] (to know the total batch size)")
            if type(self).requires_targets():
                raise ValueError(f"{type(self).__name__}.step needs targets= (the labels of the batch)")
        return closures, targets

    def _gradient_layout(self, params: list) -> tuple[int, Any, bool, bool]:
        """-> (world size, shard group or None, sharded gradients, manual sync through no_sync)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        group = shard_group(params)
        sharded = self.runtime.sharded or group is not None
        if group is not None:
            world = dist.get_world_size(group)
        manual = world > 1 and self.runtime.no_sync is not None and not sharded
        if world > 1 and sharded and self.runtime.no_sync is not None:
            self._warn_once("sharded-no-sync", "sharded=True: gradients are shards reduced by FSDP / ZeRO "
                            "in every backward; no_sync is ignored (under DeepSpeed ZeRO-2/3 it is a no-op)")
        return world, group, sharded, manual

    def _begin(self, closures, targets) -> StepState:
        closures, targets = self._micro_batches(closures, targets)
        sizes = [len(t) if t is not None else None for t in targets]
        params = self._trainable()
        self._zero_param_grads()
        world, group, sharded, manual = self._gradient_layout(params)
        device = params[0].device if params else torch.device("cpu")
        st = StepState(micro_batches=list(zip(closures, targets, strict=True)), sizes=sizes,
                       batch_size=float(sum(sizes)) if None not in sizes else None, params=params,
                       weights=local_weights(params), device=device, world=world, manual_sync=manual,
                       can_skip=not (world > 1 and not manual), one_backward=self._plan_one_backward(params),
                       norm_world=world if sharded else 1, norm_group=group,
                       inv_scale=nm.inverse_scale(self.runtime.scaler, device))
        if st.inv_scale and self._pending_growth is not None:
            self.runtime.scaler._growth_tracker.fill_(self._pending_growth)
            self._pending_growth = None
        if world > 1 and not manual:
            if not self.runtime.sync_perturbation:
                raise ValueError("sync_perturbation=False needs no_sync= (a no_sync context factory) "
                                 "and unsharded gradients (sharded=False)")
            if self.multi_backward and not st.one_backward and \
                    isinstance(self.runtime.model, torch.nn.parallel.DistributedDataParallel):
                raise ValueError(f"{type(self).__name__} back-propagates one forward more than once, which "
                                 "DDP forbids: pass no_sync=lambda: accelerator.no_sync(model)")
        return st

    @classmethod
    def requires_targets(cls):
        return not cls.allow_scalar_loss

    def _zero_param_grads(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def _decide_one_backward(self, params) -> None:
        """one_backward="auto": keep the one-backward path iff every trainable parameter sits in a layer
        with a rule and none is sharded; otherwise the exact path, said once at INFO (not a warning:
        nothing was asked for that cannot be given)."""
        sb = self.one_backward
        reason = ("FSDP2 shards the parameters" if any(is_sharded(p) for p in params)
                  else sb.uncovered(params))
        if reason is not None:
            logger.info("one_backward='auto': off (%s); the exact path runs (same update, one more backward)",
                        reason)
            sb.remove()
            self.one_backward = self.passes.one_backward = None

    def _plan_one_backward(self, params) -> bool:
        sb = self.one_backward
        if sb is None or sb.disabled is not None:
            return False
        if any(is_sharded(p) for p in params):
            sb.disabled = ("FSDP2 shards the parameters: the layer rules would see the gathered weights and "
                           "their part gradients would bypass FSDP's reduce-scatter")
            self._warn_once("sb-fsdp", "one_backward switched off: %s; using the exact two-backward path "
                            "(same update, one more backward)", sb.disabled)
            return False
        reason = sb.plan(params)
        if reason is not None:
            self._warn_once("sb:" + reason, "one_backward: %s; using the exact two-backward path "
                            "for this step (same update, one more backward)", reason)
            return False
        return True

    def per_sample(self, st: StepState, table: torch.Tensor, i: int) -> torch.Tensor:
        """table[y] for micro-batch i (table: per-class float64 tensor, cached on the label device)."""
        y = st.micro_batches[i][1]
        if not self._labels_checked and y.numel() and int(y.max()) >= table.numel():
            raise ValueError(f"label {int(y.max())} out of range for class_counts of length {table.numel()}")
        key = (id(table), y.device)
        cached = self._tables.get(key)
        if cached is None or cached[0] is not table:
            cached = self._tables[key] = (table, table.to(y.device))
        return cached[1][y]
