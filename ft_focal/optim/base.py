"""Shared machinery of the sharpness-aware optimizers: one ``step(closure, targets)`` per step.

Every optimizer of ``ft_focal.optim`` is a ``torch.optim.Optimizer`` wrapping a base optimizer
(``self.param_groups is self.base_optimizer.param_groups``, so LR schedulers built on the wrapper
work). ``step`` runs every forward / backward pass the method needs and applies the base optimizer
exactly once, at the original weights w, with the method's gradient.

Closure contract: ``closure()`` runs the forward pass at the CURRENT weights and returns per-sample
losses ``[B]`` (``reduction='none'``); ``targets`` are the labels ``[B]``. ERM and SAM also accept a
0-d (already averaged) loss. Existing ``.grad`` values are ignored and cleared; after a successful
step ``p.grad`` holds the gradient the base optimizer used. Keep every trainable parameter of the
model in the optimizer (others would accumulate gradients from every pass).

Gradient accumulation (exact big-batch semantics): pass lists ``closures=[c1, c2, ...]`` and
``targets=[y1, y2, ...]``. Every pass loops over the micro-batches, one forward and one graph at a
time, and accumulates; every per-sample loss is divided by the TOTAL batch size ``sum_i B_i``, and
norms / perturbations are computed once per pass from the accumulated gradient, so the update is the
method's update on the concatenated batch. ``pass_counts`` counts passes over the whole batch
(each costs one forward and one backward per micro-batch).

Common options:
  backward: function back-propagating a scalar, called as ``backward(loss, retain_graph=...,
    inputs=...)`` (default ``torch.Tensor.backward``; the training loop passes
    ``accelerator.backward`` - keep the accelerator's ``gradient_accumulation_steps`` at 1).
  scaler: a ``torch.amp.GradScaler`` (fp16). Each pass' gradients are unscaled before any norm is
    taken; a step whose loss or gradients are non-finite in ANY pass is skipped entirely (weights
    restored to w, base optimizer not applied, ``skipped_steps += 1``) and the scale is backed off;
    after ``growth_interval`` good steps it grows. The growth counter is kept by the optimizer (in
    its state_dict) and the new scale is set with ``scaler.update(new_scale=...)``; do not call
    ``scaler.step`` / ``scaler.update`` yourself. ``backward_applies_scaler=True`` when ``backward``
    scales the loss itself (``accelerator.backward`` under fp16 - then pass ``accelerator.scaler``);
    otherwise the optimizer calls ``scaler.scale(loss)``. Without a scaler a non-finite loss or
    gradient still skips the step.
  model: the trained ``nn.Module``. If given, running statistics of normalisation layers
    (BatchNorm ...) are saved before every perturbed forward and restored after it, so they equal the
    statistics after the first (unperturbed) forward only. Required by ``single_backward``.
  no_sync, sync_perturbation, sharded: distributed training, see ``_begin`` below and DESIGN.md.
    With ``torch.distributed`` initialised, world size > 1 and ``no_sync`` given (e.g.
    ``lambda: accelerator.no_sync(model)``) every pass runs under ``no_sync`` and the optimizer
    averages gradients itself: the perturbation gradient iff ``sync_perturbation`` (False = local
    perturbation per process, "m-sharpness"), the final gradient always. Without ``no_sync`` the
    model's own DDP hooks average every backward; methods that back-propagate one forward twice
    (all but ERM/SAM unless single_backward) then need ``no_sync``. ``sharded=True`` (FSDP / ZeRO:
    gradients are shards) makes every global norm ``sqrt(all_reduce(sum of local squares))``; the
    framework then reduces every backward itself (``no_sync`` is ignored, ``sync_perturbation`` must
    stay True). Only the norm is tested here (no FSDP / DeepSpeed on this machine).

With Accelerate call ``step`` on the optimizer itself (``accelerated_optimizer.optimizer``), not on
the ``AcceleratedOptimizer`` wrapper (it forwards no ``targets`` and, under fp16, would run its own
``scaler.step``); keep ``gradient_accumulation_steps=1`` and pass micro-batch lists instead.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .numerics import NumericsMixin, _NonFinite, add
from .single_backward import WeightedGradCapture
from .split_pass import SingleBackwardMixin

logger = logging.getLogger("ft_focal")

COMMON_KWARGS = ("backward", "scaler", "backward_applies_scaler", "model", "no_sync",
                 "sync_perturbation", "sharded")


@dataclass
class Weighting:
    """Per-sample weights of one backward: ``weights[i]`` is None (no contribution), a float or a
    tensor ``[B_i]`` for micro-batch i; the loss is ``sum_j w_j l_j / denom`` (default: total B);
    ``inputs`` restricts the gradient to these parameters."""
    weights: list
    denom: float | None = None
    inputs: list | None = None


def class_table(class_counts):
    counts = torch.as_tensor(list(class_counts) if class_counts is not None else [], dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError("class_counts must be a non-empty sequence of non-negative training-set counts")
    return counts


class SharpnessOptimizer(NumericsMixin, SingleBackwardMixin, torch.optim.Optimizer):
    method_kwargs: tuple = ()     # method keywords (registry / config validation)
    allow_scalar_loss = False     # ERM / SAM accept a 0-d (mean) loss and no targets
    multi_backward = True         # back-propagates one forward graph more than once

    def __init__(self, params, base_optimizer_cls, *, backward=None, scaler=None,
                 backward_applies_scaler=False, model=None, no_sync=None, sync_perturbation=True,
                 sharded=False, single_backward=False, single_backward_check=True, **base_kwargs):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(f"base_optimizer_cls must be a torch.optim.Optimizer class, got {base_optimizer_cls!r}")
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self._link()
        self._backward_fn = backward if backward is not None else torch.Tensor.backward
        self.scaler = scaler
        if backward_applies_scaler and scaler is None:
            raise ValueError("backward_applies_scaler=True needs the scaler the backward uses (scaler=...)")
        self.backward_applies_scaler = bool(backward_applies_scaler)
        self.model = model
        self.no_sync = no_sync
        self.sync_perturbation = bool(sync_perturbation)
        self.sharded = bool(sharded)
        self.single_backward = bool(single_backward)
        self.single_backward_check = bool(single_backward_check)
        if self.single_backward and model is None:
            raise ValueError("single_backward=True needs model= (the nn.Module, for the layer hooks)")
        self._capture = WeightedGradCapture(model) if self.single_backward else None
        self._sb_disabled = None      # reason once the single-backward path was switched off for good
        self._sb_validated = not self.single_backward_check
        self.skipped_steps = 0
        self.pass_counts = {"forward": 0, "backward": 0}
        self.last_pass_counts = {"forward": 0, "backward": 0}
        self.epoch, self.num_epochs = 0, None
        self._growth_tracker = 0
        self._warned = set()
        self._backup = None

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

    def state_dict(self):
        return {"base_optimizer": self.base_optimizer.state_dict(),
                "wrapper": {"skipped_steps": self.skipped_steps, "pass_counts": dict(self.pass_counts),
                            "epoch": self.epoch, "num_epochs": self.num_epochs,
                            "growth_tracker": self._growth_tracker, "sb_validated": self._sb_validated,
                            "sb_disabled": self._sb_disabled, **self._extra_state()}}

    def load_state_dict(self, state_dict):
        if "base_optimizer" not in state_dict:
            raise ValueError("not a state_dict of an ft_focal optimizer (no 'base_optimizer' entry)")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._link()   # load_state_dict replaces the base optimizer's param_groups / state objects
        w = state_dict.get("wrapper", {})
        self.skipped_steps = int(w.get("skipped_steps", 0))
        self.pass_counts = dict(w.get("pass_counts", {"forward": 0, "backward": 0}))
        self.epoch, self.num_epochs = int(w.get("epoch", 0)), w.get("num_epochs")
        self._growth_tracker = int(w.get("growth_tracker", 0))
        self._sb_validated = bool(w.get("sb_validated", self._sb_validated))
        self._sb_disabled = w.get("sb_disabled", self._sb_disabled)
        self._load_extra_state(w)

    def _warn_once(self, key, msg, *args):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # ------------------------------------------------------------------ the step
    def _compute(self):
        """Run the method's passes; return the final gradient list (aligned with self._params)."""
        raise NotImplementedError

    def step(self, closure=None, targets=None, *, closures=None):
        """Run every pass of the method and apply the base optimizer once; returns the mean loss
        at w (detached). ``closure`` may also be a list of micro-batch closures."""
        self._begin(closures if closures is not None else closure, targets)
        found, final = False, None
        try:
            final = self._compute()
            if self._manual:
                final = self._all_reduce_mean(final)
            found = self._check_found(final_pass=True)
        except _NonFinite:
            found = True
        finally:
            self._restore()
            self._backup = None
            self._zero_param_grads()
        if found:
            self.skipped_steps += 1
        else:
            for p, g in zip(self._params, final):
                p.grad = g
            self.base_optimizer.step()
        for k, v in self.last_pass_counts.items():
            self.pass_counts[k] += v
        self._update_scaler(found)
        loss = self._loss_sum / self._B if self._loss_sum is not None else torch.tensor(float("nan"))
        self._capture_reset()
        return loss.detach()

    def _begin(self, closures, targets):
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
        self._mbs = list(zip(closures, targets))
        sizes = [len(t) if t is not None else None for t in targets]
        self._sizes = sizes
        self._B = float(sum(sizes)) if None not in sizes else None
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._zero_param_grads()
        self._ws = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._manual = self._ws > 1 and self.no_sync is not None and not self.sharded
        if self._ws > 1 and self.sharded and self.no_sync is not None:
            self._warn_once("sharded-no-sync", "sharded=True: gradients are shards reduced by FSDP / ZeRO "
                            "in every backward; no_sync is ignored (under DeepSpeed ZeRO-2/3 it is a no-op)")
        self._sb_active = self._single_backward_ready()
        if self._ws > 1 and not self._manual:
            if not self.sync_perturbation:
                raise ValueError("sync_perturbation=False needs no_sync= (a no_sync context factory) "
                                 "and unsharded gradients (sharded=False)")
            if self._needs_multi_backward() and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
                raise ValueError(f"{type(self).__name__} back-propagates one forward more than once, which "
                                 "DDP forbids: pass no_sync=lambda: accelerator.no_sync(model)")
        self._can_skip = not (self._ws > 1 and not self._manual)
        on = self.scaler is not None and self.scaler.is_enabled()
        self._scale = float(self.scaler.get_scale()) if on else 1.0
        self._scaler_on = on
        self._found = None
        self._loss_sum = None
        self.last_pass_counts = {"forward": 0, "backward": 0}

    @classmethod
    def requires_targets(cls):
        return not cls.allow_scalar_loss

    def _needs_multi_backward(self):
        """True if some forward graph is back-propagated twice (DDP needs no_sync then)."""
        return self.multi_backward and not self._sb_active

    def _zero_param_grads(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    # ------------------------------------------------------------------ passes
    def _sync_ctx(self):
        return self.no_sync() if self._manual else contextlib.nullcontext()

    def _losses(self, i, losses):
        n = self._sizes[i]
        if not isinstance(losses, torch.Tensor):
            raise ValueError("the closure must return a tensor of per-sample losses")
        if losses.dim() == 0:
            if not self.allow_scalar_loss:
                raise ValueError(f"{type(self).__name__} needs per-sample losses of shape [B] "
                                 "(use reduction='none'); the closure returned a scalar")
            losses = (losses * (n or 1)).reshape(1)
            if self._B is None:
                self._B = 1.0
        elif losses.dim() != 1 or (n is not None and losses.numel() != n):
            raise ValueError(f"the closure must return per-sample losses of shape [{n if n else 'B'}], "
                             f"got {tuple(losses.shape)}")
        if self._B is None:
            self._B = float(losses.numel())
        return losses

    def _weighted(self, losses, w, denom):
        denom = self._B if denom is None else denom
        if isinstance(w, torch.Tensor):
            return (losses * w.to(device=losses.device, dtype=losses.dtype)).sum() / denom
        return losses.sum() * (float(w) / denom)

    def _backward(self, loss, retain=False, inputs=None):
        if self._scaler_on and not self.backward_applies_scaler:
            loss = self.scaler.scale(loss)
        kw = {}
        if retain:
            kw["retain_graph"] = True
        if inputs is not None:
            kw["inputs"] = inputs
        try:
            self._backward_fn(loss, **kw)
        except RuntimeError as exc:
            if "donated buffer" in str(exc):
                raise RuntimeError(f"{type(self).__name__} back-propagates one forward twice, which a model "
                                   "compiled with torch.compile forbids unless torch._functorch.config."
                                   "donated_buffer = False is set before compiling") from exc
            raise

    def _take(self, buf):
        for j, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            p.grad = None
            if g._is_view():   # e.g. DDP gradient_as_bucket_view: the bucket is reused
                g = g.clone()
            buf[j] = g if buf[j] is None else buf[j].add_(g)

    def _grad_pass(self, weightings, perturbed=False, split=False):
        """One pass: a forward per micro-batch at the current weights, one backward per weighting.

        Returns one gradient list per weighting (unscaled, None = zero). ``split=True`` (from
        ``_split_pass``) with the single-backward path active: weightings are ``[rest, part,
        total]``; one backward of ``total`` plus the layer hooks give ``part``, and
        ``[total - part, part]`` is returned.
        """
        ws = [w if isinstance(w, Weighting) else Weighting(w) for w in weightings]
        sb = split and self._sb_active
        bufs = [[None] * len(self._params) for _ in ws]
        used = [False] * len(ws)
        ran = False
        ctx = self._frozen_norm_stats() if perturbed else contextlib.nullcontext()
        with ctx, self._sync_ctx():
            for i, (closure, _) in enumerate(self._mbs):
                cur = [w.weights[i] for w in ws]
                if not self._can_skip:   # DDP averages every backward: all ranks must run them all
                    cur = [0.0 if c is None else c for c in cur]
                if perturbed and all(c is None for c in cur):
                    continue
                ran = True
                if sb:
                    self._split_micro_batch(i, closure, cur, bufs, used)
                    continue
                losses = self._losses(i, closure())
                self._record_loss(losses, perturbed)
                todo = [k for k, c in enumerate(cur) if c is not None]
                for n, k in enumerate(todo):
                    self._backward(self._weighted(losses, cur[k], ws[k].denom),
                                   retain=n < len(todo) - 1, inputs=ws[k].inputs)
                    self._take(bufs[k])
                    used[k] = True
                del losses
        self.last_pass_counts["forward"] += int(ran)
        self.last_pass_counts["backward"] += sum(used)
        for buf in bufs:
            self._unscale_check(buf)
        self._check_found()
        if not sb:
            return bufs
        part, total = bufs[1], bufs[2]
        if self._ws > 1 and not self._manual:
            part = self._all_reduce_mean(part)   # DDP averaged `total`; the hook part is local
        return [add(total, part, alpha=-1.0), part]

    def _record_loss(self, losses, perturbed):
        s = losses.detach().sum()
        if not perturbed:
            self._loss_sum = s if self._loss_sum is None else self._loss_sum + s
        self._found_on(s.device).add_((~torch.isfinite(s)).float())

    def _per_sample(self, table, i):
        """table[y] for micro-batch i (table: per-class float64 tensor)."""
        y = self._mbs[i][1]
        if y.numel() and int(y.max()) >= table.numel():
            raise ValueError(f"label {int(y.max())} out of range for class_counts of length {table.numel()}")
        return table.to(y.device)[y]


