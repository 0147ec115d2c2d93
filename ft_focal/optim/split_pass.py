"""How a pass uses ``WeightedGradCapture`` (single_backward.py): one backward of the total weighting,
the second weighting from the layer hooks, and the exact fallbacks."""
from __future__ import annotations

import torch

from .numerics import add, sum_optional
from .single_backward import _rng_state, _set_rng_state


class SingleBackwardMixin:
    """Methods of ``SharpnessOptimizer`` driving ``WeightedGradCapture`` inside a pass."""

    def _split_pass(self, rest, part, total=None):
        """Gradients of the weightings ``rest`` and ``part`` at w (same forward). With
        single_backward active: one backward of ``total`` (default rest + part) and layer hooks."""
        if not self._sb_active:
            return self._grad_pass([rest, part], split=True)
        if total is None:
            total = [sum_optional(r, p) for r, p in zip(rest, part)]
        return self._grad_pass([rest, part, total], split=True)

    # single-backward plumbing (the mechanism itself lives in single_backward.py)
    def _single_backward_ready(self):
        if not self.single_backward or self._sb_disabled is not None:
            return False
        reason = self._capture.plan(self._params)
        if reason is not None:
            self._warn_once("sb:" + reason, "single_backward: %s; using the exact two-backward path "
                            "for this step (same update, one more backward)", reason)
            return False
        return True

    def _split_micro_batch(self, i, closure, cur, bufs, used):
        """Single-backward micro-batch: bufs[2] += grad(total), bufs[1] += part (from the hooks, or
        from an exact backward on the retained graph on the checking step / on a fallback)."""
        rest, part, total = cur
        n = self._sizes[i]
        ratio = _ratio(part, total, n) if total is not None else None
        if ratio is None:   # nothing to back-propagate, or weights the hooks cannot express
            losses = self._losses(i, closure())
            self._record_loss(losses, False)
            todo = [(k, c) for k, c in ((0, rest), (1, part)) if c is not None]
            for m, (k, c) in enumerate(todo):
                self._backward(self._weighted(losses, c, None), retain=m < len(todo) - 1)
                tmp = [None] * len(self._params)
                self._take(tmp)
                bufs[2][:] = add(bufs[2], tmp)
                if k == 1:
                    bufs[1][:] = add(bufs[1], tmp)
                used[2 if k == 0 else 1] = True
            return
        check = part is not None and not self._sb_validated and self._can_skip
        rng = None if check else _rng_state()
        with self._capture.armed(ratio, n):
            losses = self._losses(i, closure())
        self._record_loss(losses, False)
        # the graph is kept only for the first-step check; later fallbacks recompute the forward
        self._backward(self._weighted(losses, total, None), retain=check)
        used[2] = True
        captured, reason = self._capture.collect(self._params)
        self._take(bufs[2])
        if reason is not None and not self._can_skip:   # plain DDP: no second backward allowed
            raise RuntimeError(f"single_backward cannot split this model ({reason}) and DDP forbids "
                               "the exact fallback: pass no_sync= or single_backward=False")
        if reason is None and not check:
            for j, p in enumerate(self._params):
                g = captured.get(id(p))
                if g is not None:
                    bufs[1][j] = g if bufs[1][j] is None else bufs[1][j].add_(g)
            return
        exact = [None] * len(self._params)
        if part is not None:   # exact part: on the retained graph, or on a recomputed forward
            if not check:
                del losses
                losses = self._recompute(i, closure, rng)
            self._backward(self._weighted(losses, part, None))
            used[1] = True
            self._take(exact)
        del losses
        if reason is None:
            reason = self._capture.compare(self._params, captured, exact)
            if reason is None:
                self._sb_validated = True
        if reason is not None:
            self._sb_disabled = reason
            self._warn_once("sb-off", "single_backward switched off: %s; using the exact two-backward "
                            "path from now on (same update, one more backward)", reason)
        bufs[1][:] = add(bufs[1], exact)

    def _recompute(self, i, closure, rng):
        """The forward of micro-batch i again, with the RNG state of the first run (same dropout)."""
        after = _rng_state()
        _set_rng_state(rng)
        try:
            losses = self._losses(i, closure())
        finally:
            _set_rng_state(after)
        self.last_pass_counts["forward"] += 1
        return losses

    def _capture_reset(self):
        if self._capture is not None:
            self._capture.reset()



def _ratio(part, total, n):
    """part / total per sample (0 where both are 0); None when not expressible."""
    if part is None:
        return torch.zeros(n, dtype=torch.float64) if n else None
    if n is None:
        return None
    p = part if isinstance(part, torch.Tensor) else torch.full((n,), float(part), dtype=torch.float64)
    t = total if isinstance(total, torch.Tensor) else torch.full((n,), float(total), dtype=torch.float64,
                                                                  device=p.device)
    p = p.to(torch.float64)
    t = t.to(device=p.device, dtype=torch.float64)
    if bool(((t == 0) & (p != 0)).any()):
        return None
    return torch.where(t != 0, p / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(p))
