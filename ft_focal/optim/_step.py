"""One optimizer step, top to bottom: ``step(closure, targets)`` -> the method's passes -> one base step.

``SharpnessOptimizer.step`` builds a ``StepState`` (everything the step needs, passed explicitly),
hands it with the ``Passes`` to the method's ``_compute(st, passes)`` (focal_sam.py, sam.py ...),
restores the weights, and applies the base optimizer once, at w, with the gradient ``_compute``
returned. ``Passes`` runs the forward / backward passes over the ``Runtime`` (_runtime.py: how the
host back-propagates); _numerics.py holds the elementwise kernels (foreach add, perturb, restore,
norms); one_backward/ the strategy that gets two weightings from one backward.

Closure contract: ``closure()`` runs the forward pass at the CURRENT weights and returns per-sample
losses ``[B]`` (``reduction='none'``); ``targets`` are the labels ``[B]``. ERM and SAM also accept a
0-d (already averaged) loss. Existing ``.grad`` values are ignored and cleared; after a successful
step ``p.grad`` holds the gradient the base optimizer used. Keep every trainable parameter of the
model in the optimizer (others would accumulate gradients from every pass). The options every method
shares (backward=, scaler=, model=, no_sync=, sharded= ...) are in _wrapping.py.

Host reads: a steady-state step reads ONE device value on the host, the non-finite flag that decides
whether the base optimizer runs, and NONE when the base optimizer is fused (``fused=True``: SGD,
Adam, AdamW): its kernel takes the flag as ``found_inf`` and skips the update on the device, as under
``GradScaler``, so the host queues the next step while this one runs. ``last_skipped`` is then a 0-d
device tensor. The first applied update still reads the flag: a fused SGD step skipped on its first
call would leave its momentum buffers uninitialised. Labels are checked against ``class_counts`` on
the first step only. CC-SAM needs the batch's classes on the host; ImbSAM / SSE-SAM skip the pass of
a group absent from the batch only when the labels are on the CPU (reading them is then free).

Gradient accumulation (exact big-batch semantics): ``closures=[c1, c2, ...]``, ``targets=[y1, y2,
...]``. Every pass loops over the micro-batches, one graph at a time, and accumulates; every
per-sample loss is divided by the TOTAL batch size, and norms / perturbations are computed once per
pass from the accumulated gradient: the method's update on the concatenated batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import _numerics as nm
from ._runtime import Runtime
from ._sharding import as_param_grad, local_grad, local_weights, shard_group
from ._wrapping import WrappingOptimizer
from .one_backward.split import split_in_one_backward


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
    one_backward: Any              # the one-backward strategy (one_backward/) if it runs this step, else None
    norm_world: int                # > 1: norms sum their squares over the ranks of norm_group
    norm_group: object             # process group of the shards (None: the default group)
    inv_scale: dict                # device -> 1 / loss scale (float32 0-d)
    found: dict = field(default_factory=dict)      # device -> non-finite counter
    loss_sum: torch.Tensor | None = None           # sum of the per-sample losses at w
    passes: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    backup: dict = field(default_factory=dict)     # param index -> w (perturbed ones)
    check_backwards: int = 0                       # backwards that only checked the one-backward path


class SharpnessOptimizer(WrappingOptimizer):
    """Base class of every method: ``step`` here, ``_compute`` in the method's file."""
    method_kwargs: tuple = ()     # method keywords (registry / config validation)
    allow_scalar_loss = False     # ERM / SAM accept a 0-d (mean) loss and no targets
    multi_backward = True         # back-propagates one forward graph more than once

    def __init__(self, params, base_optimizer_cls, **kwargs):
        super().__init__(params, base_optimizer_cls, **kwargs)
        self.passes = Passes(self.runtime, type(self).__name__, self.allow_scalar_loss, self._warn_once)
        self._labels_checked = False
        self._tables = {}

    def _compute(self, st: StepState, passes: Passes) -> list:
        """The method's passes; returns the final gradient list (aligned with st.params)."""
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
        finally:   # an exception in a pass must not leave the weights perturbed
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

    def _begin(self, closures, targets) -> StepState:
        closures, targets = self._micro_batches(closures, targets)
        sizes = [len(t) if t is not None else None for t in targets]
        params = self._trainable()
        self._zero_param_grads()
        world, group, sharded, manual = self._gradient_layout(params)
        device = params[0].device if params else torch.device("cpu")
        strategy = self.one_backward
        one_backward = strategy if strategy is not None and strategy.use_this_step(params, self._warn_once) else None
        st = StepState(micro_batches=list(zip(closures, targets, strict=True)), sizes=sizes,
                       batch_size=float(sum(sizes)) if None not in sizes else None, params=params,
                       weights=local_weights(params), device=device, world=world, manual_sync=manual,
                       can_skip=not (world > 1 and not manual), one_backward=one_backward,
                       norm_world=world if sharded else 1, norm_group=group,
                       inv_scale=nm.inverse_scale(self.runtime.scaler, device))
        if st.inv_scale and self._pending_growth is not None:   # a resumed run's GradScaler tracker
            self.runtime.scaler._growth_tracker.fill_(self._pending_growth)
            self._pending_growth = None
        if world > 1 and not manual:
            if not self.runtime.sync_perturbation:
                raise ValueError("sync_perturbation=False needs no_sync= (a no_sync context factory) "
                                 "and unsharded gradients (sharded=False)")
            if self.multi_backward and st.one_backward is None and \
                    isinstance(self.runtime.model, torch.nn.parallel.DistributedDataParallel):
                raise ValueError(f"{type(self).__name__} back-propagates one forward more than once, which "
                                 "DDP forbids: pass no_sync=lambda: accelerator.no_sync(model)")
        return st

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

    def skips_on_device(self) -> bool:
        """True when the next step decides on the device whether to apply the update (fused base
        optimizer, after its first applied update): no host read."""
        base = self.base_optimizer
        return (self._base_stepped and getattr(base, "_step_supports_amp_scaling", False)
                and all(g.get("fused") for g in base.param_groups))

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

    def _zero_param_grads(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @classmethod
    def requires_targets(cls) -> bool:
        return not cls.allow_scalar_loss

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


@dataclass
class Weighting:
    """Per-sample weights of one backward: ``weights[i]`` is None (no contribution), a float or a
    tensor ``[B_i]`` for micro-batch i; the loss is ``sum_j w_j l_j / denom`` (default: total B);
    ``inputs`` restricts the gradient to these parameters."""
    weights: list
    denom: float | None = None
    inputs: list | None = None


class Passes:
    """The passes a method's ``_compute`` calls, over the optimizer's ``Runtime``:

    ``grad(st, weightings)``: one forward per micro-batch, one backward per weighting.
    ``split(st, rest, part, total)``: the gradients of two weightings of the same forward; with the
    one-backward strategy active, ONE backward of ``total`` and the layer rules give both.
    ``sync_perturbation(st, g)``: the perturbation gradient averaged over processes (manual sync).
    ``perturb_sam(st, g, rho)``: w <- w + rho g / ||g|| (``step`` restores w afterwards).
    """

    def __init__(self, runtime: Runtime, method: str, allow_scalar_loss: bool, warn_once: Callable) -> None:
        self.runtime, self.method, self.allow_scalar_loss = runtime, method, allow_scalar_loss
        self.warn_once = warn_once

    def grad(self, st: StepState, weightings: list, perturbed: bool = False) -> list:
        """One pass: a forward per micro-batch at the current weights, one backward per weighting.
        Returns one gradient list per weighting (unscaled, None = zero)."""
        ws = [w if isinstance(w, Weighting) else Weighting(w) for w in weightings]
        bufs = [[None] * len(st.params) for _ in ws]
        used = [False] * len(ws)
        ran = False
        ctx = nm.frozen_norm_stats(self.runtime.model) if perturbed else contextlib.nullcontext()
        with ctx, self.sync_ctx(st):
            for i in range(len(st.micro_batches)):
                cur = [w.weights[i] for w in ws]
                if not st.can_skip:   # DDP averages every backward: all ranks must run them all
                    cur = [0.0 if c is None else c for c in cur]
                if perturbed and all(c is None for c in cur):
                    continue
                ran = True
                losses = self.forward(st, i, perturbed)
                todo = [k for k, c in enumerate(cur) if c is not None]
                for n, k in enumerate(todo):
                    self.backward(self.weighted(st, losses, cur[k], ws[k].denom),
                                  retain=n < len(todo) - 1, inputs=ws[k].inputs)
                    self.take(st, bufs[k])
                    used[k] = True
                del losses
        st.passes["forward"] += int(ran)
        st.passes["backward"] += sum(used)
        return self.finish(st, bufs)

    def split(self, st: StepState, rest: list, part: list, total: list) -> list:
        """Gradients ``[G_rest, G_part]`` of two weightings of the same forward at w; ``total`` is their
        sum per micro-batch (the one backward's weighting; the method knows it in closed form)."""
        if st.one_backward is None:
            return self.grad(st, [rest, part])
        return split_in_one_backward(self, st, rest, part, total)

    def sync_perturbation(self, st: StepState, grads: list) -> list:
        """The perturbation gradient, averaged over the processes when the passes ran under no_sync."""
        if st.manual_sync and self.runtime.sync_perturbation:
            return nm.all_reduce_mean(grads, st.weights, st.world)
        return grads

    def perturb_sam(self, st: StepState, g: list, rho: float, adaptive: bool = False, eta: float = 0.0) -> None:
        """SAM ascent w <- w + rho g / (||g|| + 1e-12) (ASAM: see _numerics.sam_direction)."""
        if rho == 0:
            return
        direction, scale = nm.sam_direction(g, st.weights, st.device, adaptive, eta, st.norm_world, st.norm_group)
        nm.perturb_(st.weights, direction, scale * rho, st.backup)

    # ------------------------------------------------------------------ the pieces of a pass
    def sync_ctx(self, st: StepState):
        return self.runtime.no_sync() if st.manual_sync else contextlib.nullcontext()

    def forward(self, st: StepState, i: int, perturbed: bool) -> torch.Tensor:
        """Micro-batch i's per-sample losses [B_i]; at w (not perturbed) their sum adds to the step's loss."""
        losses = self.losses(st, i, st.micro_batches[i][0]())
        s = losses.detach().sum()
        if not perturbed:
            st.loss_sum = s if st.loss_sum is None else st.loss_sum + s
        nm.found_flag(st.found, s.device).add_((~torch.isfinite(s)).float())
        return losses

    def losses(self, st: StepState, i: int, losses) -> torch.Tensor:
        """The closure's output checked (one-line errors) and shaped [B_i]."""
        n = st.sizes[i]
        if not isinstance(losses, torch.Tensor):
            raise ValueError("the closure must return a tensor of per-sample losses")
        if losses.dim() == 0:
            if not self.allow_scalar_loss:
                raise ValueError(f"{self.method} needs per-sample losses of shape [B] "
                                 "(use reduction='none'); the closure returned a scalar")
            losses = (losses * (n or 1)).reshape(1)
            if st.batch_size is None:
                st.batch_size = 1.0
        elif losses.dim() != 1 or (n is not None and losses.numel() != n):
            raise ValueError(f"the closure must return per-sample losses of shape [{n if n else 'B'}], "
                             f"got {tuple(losses.shape)}")
        if st.batch_size is None:
            st.batch_size = float(losses.numel())
        return losses

    @staticmethod
    def weighted(st: StepState, losses: torch.Tensor, w, denom: float | None = None) -> torch.Tensor:
        """``sum_j w_j l_j / denom`` (denom: the step's total batch size unless given)."""
        denom = st.batch_size if denom is None else denom
        if isinstance(w, torch.Tensor):
            return (losses * w.to(device=losses.device, dtype=losses.dtype)).sum() / denom
        return losses.sum() * (float(w) / denom)

    def backward(self, loss: torch.Tensor, retain: bool = False, inputs: list | None = None) -> None:
        rt = self.runtime
        if rt.scaler is not None and rt.scaler.is_enabled() and not rt.backward_applies_scaler:
            loss = rt.scaler.scale(loss)
        kw = {"retain_graph": True} if retain else {}
        if inputs is not None:
            kw["inputs"] = inputs
        try:
            rt.backward(loss, **kw)
        except RuntimeError as exc:
            if "donated buffer" in str(exc):
                raise RuntimeError(f"{self.method} back-propagates one forward twice, which a model "
                                   "compiled with torch.compile forbids unless torch._functorch.config."
                                   "donated_buffer = False is set before compiling") from exc
            raise

    @staticmethod
    def take(st: StepState, buf: list) -> None:
        """Move every p.grad into ``buf`` (accumulating over micro-batches)."""
        for j, p in enumerate(st.params):
            g = p.grad
            if g is None:
                continue
            p.grad = None
            g = local_grad(g)   # FSDP2: this rank's shard of the reduce-scattered gradient
            if g._is_view():   # e.g. DDP gradient_as_bucket_view: the bucket is reused
                g = g.clone()
            buf[j] = g if buf[j] is None else buf[j].add_(g)

    @staticmethod
    def finish(st: StepState, bufs: list) -> list:
        """Unscale every gradient list (fp16) and count its non-finite values."""
        for buf in bufs:
            nm.unscale_and_check(buf, st.found, st.inv_scale)
        return bufs
