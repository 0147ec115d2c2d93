"""The passes a method is made of: forward + backward(s) over the whole batch, at w or perturbed.

A method's ``_compute(st, passes)`` calls, and only calls, these (every call visible where it is made):

``passes.grad(st, weightings)``: one forward per micro-batch, one backward per weighting.
``passes.split(st, rest, part, total)``: the gradients of two weightings of the same forward; with the
one-backward strategy active, ONE backward of ``total`` and the layer rules give both.
``passes.sync_perturbation(st, g)``: the perturbation gradient averaged over processes (manual sync).
``passes.perturb_sam(st, g, rho)``: w <- w + rho g / ||g|| (on the device; ``numerics.restore_`` undoes it).

``Runtime`` is how the host runs a backward (its ``backward``, GradScaler, DDP ``no_sync``, sharding,
the model); the optimizer owns one, and ``Passes`` reads it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import numerics as nm
from ._sharding import local_grad


@dataclass
class Weighting:
    """Per-sample weights of one backward: ``weights[i]`` is None (no contribution), a float or a
    tensor ``[B_i]`` for micro-batch i; the loss is ``sum_j w_j l_j / denom`` (default: total B);
    ``inputs`` restricts the gradient to these parameters."""
    weights: list
    denom: float | None = None
    inputs: list | None = None


@dataclass
class Runtime:
    """How the host back-propagates (base.py's docstring, "Common options", says each in full).

    backward: ``backward(loss, retain_graph=..., inputs=...)`` (``accelerator.backward`` in the Trainer).
    scaler: a GradScaler under fp16, else None; ``backward_applies_scaler``: ``backward`` scales itself.
    model: the trained module (normalisation statistics, one-backward layer rules), or None.
    no_sync: a context factory: the passes run under it and the optimizer averages gradients itself.
    sync_perturbation: average the perturbation gradient too (False: m-sharpness, per process).
    sharded: gradients are shards (FSDP / ZeRO): norms all-reduce their squares.
    """
    backward: Callable = torch.Tensor.backward
    scaler: Any = None
    backward_applies_scaler: bool = False
    model: torch.nn.Module | None = None
    no_sync: Callable | None = None
    sync_perturbation: bool = True
    sharded: bool = False

    def keywords(self) -> dict:
        """The optimizer keywords that build this runtime (``build_optimizer(..., **keywords)``)."""
        # not dataclasses.asdict: it deep-copies every value, the model and bound methods included
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def for_accelerate(cls, accelerator: Any, model: torch.nn.Module, wrapped: Callable[[], torch.nn.Module],
                       no_sync: bool = True) -> "Runtime":
        """An Accelerate loop's (ft_focal's Trainer, the HF Trainer): ``accelerator.backward``, which under
        fp16 scales the loss with ``accelerator.scaler`` itself; with several processes every pass runs
        under ``accelerator.no_sync(wrapped())`` (``wrapped`` is called at step time: the DDP module exists
        only after ``accelerator.prepare``) unless ``no_sync=False`` (FSDP2: the optimizer sees shards).
        ``model``: the unwrapped module (layer rules, normalisation statistics)."""
        runtime = cls(backward=accelerator.backward, model=model)
        if accelerator.scaler is not None:
            runtime.scaler, runtime.backward_applies_scaler = accelerator.scaler, True
        if accelerator.num_processes > 1 and no_sync:
            runtime.no_sync = lambda: accelerator.no_sync(wrapped())
        return runtime

    @classmethod
    def for_lightning(cls, module: Any) -> "Runtime":
        """A LightningModule's under manual optimization: ``manual_backward`` (which scales the loss under
        precision="16-mixed" with the precision plugin's scaler); with several processes every pass runs
        under the strategy's ``block_backward_sync`` (looked up at step time: the strategy wraps the
        module after ``configure_optimizers``)."""
        trainer = module.trainer
        runtime = cls(backward=module.manual_backward, model=module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            runtime.scaler, runtime.backward_applies_scaler = scaler, True
        if trainer.world_size > 1:
            runtime.no_sync = lambda: trainer.strategy.block_backward_sync()
        return runtime


class Passes:
    """The passes of one optimizer, over its ``Runtime``; every call takes the step's ``StepState``.

    ``method``: the optimizer's class name (error messages); ``allow_scalar_loss``: a 0-d loss is
    accepted (ERM, SAM); ``one_backward``: the strategy object (one_backward/__init__.py) or None;
    ``warn_once(key, msg, *args)``: the optimizer's once-per-key warning.
    """

    def __init__(self, runtime: Runtime, method: str, allow_scalar_loss: bool, one_backward: Any,
                 warn_once: Callable) -> None:
        self.runtime, self.method, self.allow_scalar_loss = runtime, method, allow_scalar_loss
        self.one_backward, self.warn_once = one_backward, warn_once

    def _sync_ctx(self, st):
        return self.runtime.no_sync() if st.manual_sync else contextlib.nullcontext()

    def _losses(self, st, i, losses):
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

    def _forward(self, st, i, perturbed):
        losses = self._losses(st, i, st.micro_batches[i][0]())
        s = losses.detach().sum()
        if not perturbed:
            st.loss_sum = s if st.loss_sum is None else st.loss_sum + s
        nm.found_flag(st.found, s.device).add_((~torch.isfinite(s)).float())
        return losses

    @staticmethod
    def _weighted(st, losses, w, denom=None):
        denom = st.batch_size if denom is None else denom
        if isinstance(w, torch.Tensor):
            return (losses * w.to(device=losses.device, dtype=losses.dtype)).sum() / denom
        return losses.sum() * (float(w) / denom)

    def _backward(self, loss, retain=False, inputs=None):
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
    def _take(st, buf):
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

    def _finish(self, st, bufs):
        for buf in bufs:
            nm.unscale_and_check(buf, st.found, st.inv_scale)
        return bufs

    def grad(self, st, weightings, perturbed=False):
        """One pass: a forward per micro-batch at the current weights, one backward per weighting.
        Returns one gradient list per weighting (unscaled, None = zero)."""
        ws = [w if isinstance(w, Weighting) else Weighting(w) for w in weightings]
        bufs = [[None] * len(st.params) for _ in ws]
        used = [False] * len(ws)
        ran = False
        ctx = nm.frozen_norm_stats(self.runtime.model) if perturbed else contextlib.nullcontext()
        with ctx, self._sync_ctx(st):
            for i in range(len(st.micro_batches)):
                cur = [w.weights[i] for w in ws]
                if not st.can_skip:   # DDP averages every backward: all ranks must run them all
                    cur = [0.0 if c is None else c for c in cur]
                if perturbed and all(c is None for c in cur):
                    continue
                ran = True
                losses = self._forward(st, i, perturbed)
                todo = [k for k, c in enumerate(cur) if c is not None]
                for n, k in enumerate(todo):
                    self._backward(self._weighted(st, losses, cur[k], ws[k].denom),
                                   retain=n < len(todo) - 1, inputs=ws[k].inputs)
                    self._take(st, bufs[k])
                    used[k] = True
                del losses
        st.passes["forward"] += int(ran)
        st.passes["backward"] += sum(used)
        return self._finish(st, bufs)

    def split(self, st, rest, part, total=None):
        """Gradients ``[G_rest, G_part]`` of two weightings of the same forward at w."""
        if not st.one_backward:
            return self.grad(st, [rest, part])
        if total is None:
            total = [nm.sum_optional(r, p) for r, p in zip(rest, part, strict=True)]
        return self._one_backward_pass(st, rest, part, total)

    def sync_perturbation(self, st, grads):
        """The perturbation gradient, averaged over the processes when the passes ran under no_sync."""
        if st.manual_sync and self.runtime.sync_perturbation:
            return nm.all_reduce_mean(grads, st.weights, st.world)
        return grads

    def perturb_sam(self, st, g, rho, adaptive=False, eta=0.0):
        """SAM ascent w <- w + rho g / (||g|| + 1e-12) (ASAM: see numerics.sam_direction)."""
        if rho == 0:
            return
        direction, scale = nm.sam_direction(g, st.weights, st.device, adaptive, eta, st.norm_world, st.norm_group)
        nm.perturb_(st.weights, direction, scale * rho, st.backup)

    # ------------------------------------------------------------------ one backward
    def _one_backward_pass(self, st, rest, part, total):
        sb = self.one_backward
        n_par = len(st.params)
        g_total, g_part = [None] * n_par, [None] * n_par
        backwards = 1
        with self._sync_ctx(st):
            for i in range(len(st.micro_batches)):
                r, p, t = rest[i], part[i], total[i]
                if not st.can_skip:
                    r, p = (0.0 if r is None else r), (0.0 if p is None else p)
                    t = nm.sum_optional(r, p) if t is None else t
                if t is None:
                    continue
                check = p is not None and not sb.validated and st.can_skip
                rng = None if check else _rng_state()
                with sb.armed(_ratio(p, t, st.sizes[i], st.device), st.sizes[i], check=check):
                    losses = self._forward(st, i, False)
                self._backward(self._weighted(st, losses, t), retain=check)
                parts, reason = sb.collect(st.params)
                magnitudes = sb.magnitudes(st.params)
                self._take(st, g_total)
                if reason is not None and not st.can_skip:   # plain DDP: no second backward allowed
                    raise RuntimeError(f"one_backward cannot split this model ({reason}) and DDP forbids "
                                       "the exact fallback: pass no_sync= or one_backward=False")
                if reason is None and not check:
                    g_part[:] = nm.add(g_part, parts)
                    continue
                exact = [None] * n_par
                if p is not None:   # the exact part: on the retained graph, or on a recomputed forward
                    if not check:
                        del losses
                        losses = self._recompute(st, i, rng)
                    self._backward(self._weighted(st, losses, p))
                    backwards = 2
                    self._take(st, exact)
                    sb.reset()   # the retained graph's rules also filled the twins: drop that
                del losses
                if reason is None:
                    reason = sb.compare(st.params, parts, exact, magnitudes)
                    if reason is None:
                        sb.validated = True
                        st.check_backwards = 1
                if reason is not None:
                    sb.disabled = reason
                    self.warn_once("sb-off", "one_backward switched off: %s; using the exact "
                                    "two-backward path from now on (same update, one more backward)", reason)
                g_part[:] = nm.add(g_part, exact)
        st.passes["forward"] += 1
        st.passes["backward"] += backwards
        g_total, g_part = self._finish(st, [g_total, g_part])
        if st.world > 1 and not st.manual_sync:
            g_part = nm.all_reduce_mean(g_part, st.weights, st.world)   # DDP averaged g_total only
        return [nm.add(g_total, g_part, alpha=-1.0), g_part]

    def _recompute(self, st, i, rng):
        """The forward of micro-batch i again, with the RNG state of the first run (same dropout)."""
        after = _rng_state()
        _set_rng_state(rng)
        try:
            losses = self._losses(st, i, st.micro_batches[i][0]())
        finally:
            _set_rng_state(after)
        st.passes["forward"] += 1
        return losses


def _ratio(part, total, n, device):
    """part / total per sample ([n], 0 where total is 0), on the labels' device."""
    if part is None:
        return torch.zeros(n, dtype=torch.float64, device=device)
    p = part if isinstance(part, torch.Tensor) else torch.full((n,), float(part), dtype=torch.float64, device=device)
    if not isinstance(total, torch.Tensor):
        return p if float(total) == 1.0 else p / float(total)
    t = total.to(device=p.device, dtype=p.dtype)
    return torch.where(t != 0, p / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(p))


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
