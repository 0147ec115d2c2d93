"""Numerics shared by every optimizer: non-finite checks, GradScaler, global norms, distributed
averaging, normalisation-statistics freezing and the perturb / restore of the weights."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _NormBase


class _NonFinite(Exception):
    """Raised (single process only) to abort a step as soon as a pass is non-finite."""


def sum_optional(a, b):
    """a + b where None stands for "no term" (a per-sample weight vector that is absent)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def add(a, b, alpha=1.0):
    """Elementwise a + alpha * b over gradient lists (None = zero)."""
    out = []
    for x, y in zip(a, b):
        if y is None:
            out.append(x)
        elif x is None:
            out.append(y if alpha == 1.0 else y * alpha)
        else:
            out.append(x.add(y, alpha=alpha))
    return out


class NumericsMixin:
    """Methods of ``SharpnessOptimizer`` (see base.py) that do not depend on the method."""

    def _frozen_norm_stats(self):
        """Save running statistics of every normalisation layer in training mode; restore on exit."""
        saved = []
        if self.model is not None:
            for m in self.model.modules():
                if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                    saved.append((m, [(n, b.detach().clone()) for n, b in m.named_buffers(recurse=False)
                                      if b is not None]))

        @contextlib.contextmanager
        def ctx():
            try:
                yield
            finally:
                with torch.no_grad():
                    for m, bufs in saved:
                        for n, b in bufs:
                            getattr(m, n).copy_(b)
        return ctx()

    # ------------------------------------------------------------------ numerics
    def _unscale_check(self, grads):
        ts = [g for g in grads if g is not None]
        groups = {}
        for g in ts:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), lst in groups.items():
            found = self._found_on(dev)
            inv = torch.full((), 1.0 / self._scale, dtype=torch.float32, device=dev)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(lst, found, inv)
            except (RuntimeError, AttributeError):
                for g in lst:
                    if self._scale != 1.0:
                        g.mul_(1.0 / self._scale)
                    found.add_((~torch.isfinite(g)).any().float())

    def _found_on(self, dev):
        if self._found is None:
            self._found = {}
        if dev not in self._found:
            self._found[dev] = torch.zeros((), dtype=torch.float32, device=dev)
        return self._found[dev]

    def _check_found(self, final_pass=False):
        """Single process: abort at once if a loss or gradient was non-finite. Several processes:
        decide (all-reduced) only at the end of the step, so every rank runs the same collectives."""
        if self._ws > 1 and not final_pass:
            return False
        dev = self._device()
        flags = [f.to(dev) for f in (self._found or {}).values()]
        flag = torch.stack(flags).sum() if flags else torch.zeros((), device=dev)
        if self._ws > 1:
            dist.all_reduce(flag)
        bad = bool(flag > 0)
        if bad and not final_pass:
            raise _NonFinite
        return bad

    def _device(self):
        return self._params[0].device if self._params else torch.device("cpu")

    def _update_scaler(self, found):
        if not self._scaler_on:
            return
        s = self.scaler.get_scale()
        if found:
            s, self._growth_tracker = s * self.scaler.get_backoff_factor(), 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker >= self.scaler.get_growth_interval():
                s, self._growth_tracker = s * self.scaler.get_growth_factor(), 0
        if getattr(self.scaler, "_scale", None) is None:   # never used (no backward ran)
            self.scaler._lazy_init_scale_growth_tracker(self._device())
        self.scaler.update(new_scale=min(float(s), torch.finfo(torch.float32).max))

    def _global_norm(self, tensors):
        """L2 norm over all given tensors (float64 scalar); all-reduced over ranks when sharded."""
        groups = {}
        for t in tensors:
            if t is not None:
                groups.setdefault((t.device, t.dtype), []).append(t)
        dev = self._device()
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for lst in groups.values():
            norms = torch._foreach_norm(lst)
            sq = sq + torch.stack([n.to(device=dev, dtype=torch.float64) for n in norms]).pow(2).sum()
        if self.sharded and self._ws > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def _all_reduce_mean(self, grads):
        """Average a gradient list over processes (parameters without a gradient anywhere stay None)."""
        if self._ws == 1:
            return grads
        dev = self._device()
        present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=dev)
        dist.all_reduce(present)
        out = [g if g is not None or present[j] == 0 else torch.zeros_like(self._params[j])
               for j, g in enumerate(grads)]
        by_dtype = {}
        for j, g in enumerate(out):
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(j)
        for idx in by_dtype.values():
            flat = torch.cat([out[j].reshape(-1) for j in idx])
            dist.all_reduce(flat)
            flat.div_(self._ws)
            off = 0
            for j in idx:
                n = out[j].numel()
                out[j] = flat[off:off + n].view_as(out[j])
                off += n
        return out

    def _sync_perturbation_grads(self, grads):
        return self._all_reduce_mean(grads) if self._manual and self.sync_perturbation else grads

    # ------------------------------------------------------------------ perturbation
    @torch.no_grad()
    def _perturb(self, directions, scales, only=None):
        """w <- w + scale_j * direction_j (w is backed up once per step; _restore copies it back)."""
        if self._backup is None:
            self._backup = {}
        for j, (p, d) in enumerate(zip(self._params, directions)):
            if d is None or (only is not None and j not in only):
                continue
            s = scales[j] if isinstance(scales, (list, tuple)) else scales
            if j not in self._backup:
                self._backup[j] = p.detach().clone()
            p.add_(d.to(p.dtype), alpha=float(s))

    @torch.no_grad()
    def _restore(self):
        if self._backup:
            for j, b in self._backup.items():
                self._params[j].copy_(b)

    def _perturb_sam(self, g, rho, adaptive=False, eta=0.0):
        """SAM ascent: eps = rho g / (||g|| + 1e-12); ASAM (davda54/sam form, T = |w| + eta):
        eps = rho T^2 g / (||T g|| + 1e-12). Zero or missing gradient -> no perturbation."""
        if rho == 0:
            return
        if adaptive:
            t = [None if x is None else p.detach().abs().add(eta) for p, x in zip(self._params, g)]
            norm = self._global_norm([None if x is None else x * s for x, s in zip(g, t)])
            g = [None if x is None else x * s * s for x, s in zip(g, t)]
        else:
            norm = self._global_norm(g)
        scale = rho / (float(norm) + 1e-12)
        if math.isfinite(scale) and math.isfinite(float(norm)):
            self._perturb(g, scale)
