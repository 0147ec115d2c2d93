"""``Passes.split`` with the one-backward strategy: two weightings' gradients from ONE backward.

One forward per micro-batch runs with the covered layers armed (ratio part / total per sample); one
backward of the ``total`` weighting gives ``G_total`` and the layer rules ``G_part``; the result is
``[G_total - G_part, G_part]``, the same update as two exact backwards (to float rounding). The first
step also back-propagates ``part`` exactly on the retained graph and compares (``OneBackward.compare``);
a mismatch, or a parameter the rules missed, switches the strategy off and uses the exact gradient,
recomputing the forward with the first run's RNG state (same dropout) when the graph was not kept.
"""
from __future__ import annotations

import torch

from .. import _numerics as nm


def split_in_one_backward(passes, st, rest: list, part: list, total: list) -> list:
    """[G_rest, G_part] for the step ``st`` (_step.py's ``StepState``); ``passes``: its ``Passes``.

    ``rest`` / ``part`` / ``total``: per micro-batch, None / a float / a per-sample tensor [B_i]."""
    sb = st.one_backward
    n_par = len(st.params)
    g_total, g_part = [None] * n_par, [None] * n_par
    backwards = 1
    with passes.sync_ctx(st):
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
                losses = passes.forward(st, i, False)
            passes.backward(passes.weighted(st, losses, t), retain=check)
            parts, reason = sb.collect(st.params)
            magnitudes = sb.magnitudes(st.params)
            passes.take(st, g_total)
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
                    losses = _recompute(passes, st, i, rng)
                passes.backward(passes.weighted(st, losses, p))
                backwards = 2
                passes.take(st, exact)
                sb.reset()   # the retained graph's rules also filled the twins: drop that
            del losses
            if reason is None:
                reason = sb.compare(st.params, parts, exact, magnitudes)
                if reason is None:
                    sb.validated = True
                    st.check_backwards = 1
            if reason is not None:
                sb.disabled = reason
                passes.warn_once("sb-off", "one_backward switched off: %s; using the exact "
                                 "two-backward path from now on (same update, one more backward)", reason)
            g_part[:] = nm.add(g_part, exact)
    st.passes["forward"] += 1
    st.passes["backward"] += backwards
    g_total, g_part = passes.finish(st, [g_total, g_part])
    if st.world > 1 and not st.manual_sync:
        g_part = nm.all_reduce_mean(g_part, st.weights, st.world)   # DDP averaged g_total only
    return [nm.add(g_total, g_part, alpha=-1.0), g_part]


def _recompute(passes, st, i: int, rng):
    """The forward of micro-batch i again, with the RNG state of the first run (same dropout)."""
    after = _rng_state()
    _set_rng_state(rng)
    try:
        losses = passes.losses(st, i, st.micro_batches[i][0]())
    finally:
        _set_rng_state(after)
    st.passes["forward"] += 1
    return losses


def _ratio(part, total, n: int, device) -> torch.Tensor:
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


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
