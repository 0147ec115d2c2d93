"""Numerics shared by every optimizer, as plain functions over gradient lists.

A gradient list is aligned with the optimizer's trainable parameters; None stands for a zero
gradient. Nothing here reads a device value on the host (each such read is a GPU stall): norms,
scales and non-finite flags stay tensors, and the perturbation uses foreach kernels.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _NormBase


def sum_optional(a, b):
    """a + b where None stands for "no term" (a per-sample weight vector that is absent)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def add(a: list, b: list, alpha: float = 1.0) -> list:
    """Elementwise a + alpha * b over gradient lists (None = zero); one foreach kernel for the pairs."""
    out = list(a)
    both = [j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x is not None and y is not None]
    if both:
        summed = torch._foreach_add([a[j] for j in both], [b[j] for j in both], alpha=alpha)
        for j, s in zip(both, summed, strict=True):
            out[j] = s
    for j, (x, y) in enumerate(zip(a, b, strict=True)):
        if x is None and y is not None:
            out[j] = y if alpha == 1.0 else y * alpha
    return out


def _groups(tensors):
    groups = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def global_norm(tensors: list, device: torch.device, sharded_world: int = 1, group=None) -> torch.Tensor:
    """L2 norm over all given tensors (float64 0-d tensor on ``device``); with ``sharded_world > 1``
    the squares are summed over the ranks of ``group`` (default: all) - FSDP / ZeRO tensors are
    shards, so the norm is sqrt(all_reduce(sum of local squares))."""
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for lst in _groups(tensors).values():
        norms = torch.stack(torch._foreach_norm(lst)).to(device=device, dtype=torch.float64)
        sq = sq + norms.pow(2).sum()
    if sharded_world > 1:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def unscale_and_check(grads: list, found: dict, inv_scale: dict) -> None:
    """Multiply by 1 / loss scale in place and add 1 to ``found[device]`` for a non-finite value."""
    for (dev, _), lst in _groups(grads).items():
        flag = found_flag(found, dev)
        inv = inv_scale.get(dev)
        if inv is None:
            inv = inv_scale[dev] = torch.ones((), dtype=torch.float32, device=dev)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(lst, flag, inv)
        except (RuntimeError, NotImplementedError):   # dtypes the fused kernel lacks (e.g. CPU float64)
            torch._foreach_mul_(lst, inv.to(lst[0].dtype))
            flag.add_((~torch.isfinite(torch.stack(torch._foreach_norm(lst, ord=1)))).any().float())


def found_flag(found: dict, dev) -> torch.Tensor:
    """The non-finite counter of one device (float32 0-d), created on first use."""
    if dev not in found:
        found[dev] = torch.zeros((), dtype=torch.float32, device=dev)
    return found[dev]


def any_found(found: dict, device, world: int) -> torch.Tensor:
    """Sum of the flags of every device (and rank): a 0-d tensor, > 0 if anything was non-finite."""
    flags = [f.to(device) for f in found.values()]
    flag = torch.stack(flags).sum() if flags else torch.zeros((), device=device)
    if world > 1:
        dist.all_reduce(flag)
    return flag


def all_reduce_mean(grads: list, params: list, world: int) -> list:
    """Average a gradient list over processes (parameters without a gradient anywhere stay None).
    Reads one presence vector on the host (distributed runs only)."""
    if world == 1:
        return grads
    dev = params[0].device
    present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=dev)
    dist.all_reduce(present)
    anywhere = present.tolist()
    out = [g if g is not None or anywhere[j] == 0 else torch.zeros_like(params[j]) for j, g in enumerate(grads)]
    by_dtype = {}
    for j, g in enumerate(out):
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(j)
    for idx in by_dtype.values():
        flat = torch.cat([out[j].reshape(-1) for j in idx])
        dist.all_reduce(flat)
        flat.div_(world)
        off = 0
        for j in idx:
            n = out[j].numel()
            out[j] = flat[off:off + n].view_as(out[j])
            off += n
    return out


@torch.no_grad()
def perturb_(params: list, directions: list, scale, backup: dict) -> None:
    """w <- w + scale * direction (scale: a number or a 0-d tensor, kept on the device). Each
    perturbed parameter is copied into ``backup`` (index -> tensor) once, for ``restore_``."""
    idx = [j for j, d in enumerate(directions) if d is not None]
    if not idx:
        return
    fresh = [j for j in idx if j not in backup]
    if fresh:
        # one foreach kernel copies them all (x * 1.0 is exact)
        for j, b in zip(fresh, torch._foreach_mul([params[j].detach() for j in fresh], 1.0), strict=True):
            backup[j] = b
    ps = [params[j].detach() for j in idx]
    ds = [directions[j] if directions[j].dtype == ps[k].dtype else directions[j].to(ps[k].dtype)
          for k, j in enumerate(idx)]
    if isinstance(scale, torch.Tensor):
        torch._foreach_add_(ps, torch._foreach_mul(ds, scale.to(ps[0].dtype)))
    else:
        torch._foreach_add_(ps, ds, alpha=float(scale))


@torch.no_grad()
def restore_(params: list, backup: dict) -> None:
    """Copy the backed-up weights back (the exact w, not w + eps - eps)."""
    if backup:
        idx = list(backup)
        torch._foreach_copy_([params[j].detach() for j in idx], [backup[j] for j in idx])


def sam_direction(grads: list, params: list, device, adaptive: bool = False, eta: float = 0.0,
                  sharded_world: int = 1, group=None):
    """(direction, scale) of the SAM ascent step eps = rho * scale * direction, without rho:
    SAM: g / (||g|| + 1e-12); ASAM (davda54/sam form, T = |w| + eta): T^2 g / (||T g|| + 1e-12).
    The scale is a 0-d device tensor (no host read); a zero gradient gives a zero step."""
    if adaptive:
        idx = [j for j, g in enumerate(grads) if g is not None]
        t = torch._foreach_add(torch._foreach_abs([params[j].detach() for j in idx]), eta)
        tg = torch._foreach_mul([grads[j] for j in idx], t)
        norm = global_norm(tg, device, sharded_world, group)
        direction = [None] * len(grads)
        for j, d in zip(idx, torch._foreach_mul(tg, t), strict=True):
            direction[j] = d
    else:
        norm, direction = global_norm(grads, device, sharded_world, group), grads
    return direction, 1.0 / (norm + 1e-12)


@contextlib.contextmanager
def frozen_norm_stats(model):
    """Save running statistics of every normalisation layer in training mode; restore on exit."""
    saved = []
    if model is not None:
        for m in model.modules():
            if isinstance(m, _NormBase) and m.training and m.track_running_stats:
                saved.append((m, [(n, b.detach().clone()) for n, b in m.named_buffers(recurse=False)
                                  if b is not None]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for n, b in bufs:
                    getattr(m, n).copy_(b)


def inverse_scale(scaler, device) -> dict:
    """{device: 1 / loss scale} as float32 0-d tensors (GradScaler.unscale_'s own arithmetic)."""
    if scaler is None or not scaler.is_enabled():
        return {}
    if getattr(scaler, "_scale", None) is None:
        scaler._lazy_init_scale_growth_tracker(device)
    return {scaler._scale.device: scaler._scale.double().reciprocal().float()}


def update_scale(scaler, found: torch.Tensor) -> None:
    """GradScaler.update's rule on the device: back off after a non-finite step, grow after
    ``growth_interval`` good ones (the scaler's own growth tracker)."""
    torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, found.to(scaler._scale.device).float(),
                             scaler.get_growth_factor(), scaler.get_backoff_factor(),
                             scaler.get_growth_interval())
