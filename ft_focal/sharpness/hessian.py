"""Sharpness diagnostics: Hessian eigenvalues, Hessian trace and first-order (SAM) sharpness.

All quantities refer to the average loss over a data set that is streamed in batches:

    L(w) = (1 / N) * sum_j l_j(w),    N = total number of samples,

with the Hessian taken with respect to an explicit list of trainable parameters ``params``
(e.g. the LoRA / AdaptFormer / head parameters; every one must have ``requires_grad=True``).

The low-level functions take a ``loss_fn(batch)`` that closes over the model and returns
either ``(mean_loss, n)`` -- the mean loss over the ``n`` samples of that batch it used -- or a
scalar tensor (then every batch counts as one sample, i.e. batches are weighted equally).
Batches with ``n = 0`` are skipped. Streaming is exact: with weights ``n_b / N`` the gradient,
Hessian-vector products and losses equal those of the full-data mean loss, while memory stays
that of one batch (plus a few parameter-sized vectors).

``batches`` is a re-iterable (a list, a DataLoader) or a zero-argument callable returning a
fresh iterator; every diagnostic passes over the data many times (one pass per Hessian-vector
product), so a one-shot generator is rejected.

Costs, in passes over the data (each pass = forward + double backward per batch):
``top_hessian_eigenvalues`` about ``k * iters``, ``hutchinson_trace`` ``samples``,
``first_order_sharpness`` 1 gradient pass + 2 forward-only passes.

Put the model in eval mode (no dropout, frozen BatchNorm statistics) before calling the
low-level functions; :func:`group_sharpness` does that itself and restores the previous mode.
All randomness comes from a ``torch.Generator`` seeded with ``seed`` (on the CPU), so results are
deterministic for a given seed, data order and device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "hessian_vector_product",
    "top_hessian_eigenvalues",
    "hutchinson_trace",
    "exact_hessian_trace",
    "dense_hessian",
    "first_order_sharpness",
]

Batches = Iterable[Any] | Callable[[], Iterable[Any]]
LossFn = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, int]"]


# ----------------------------------------------------------------------------- helpers

def iterate_batches(batches: Batches) -> Iterator[Any]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return iter(batches())
    it = iter(batches)
    if it is batches:
        raise ValueError(
            "batches is a one-shot iterator; pass a list / DataLoader or a callable that "
            "returns a fresh iterator (the data is traversed many times)"
        )
    return it


def check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: nothing to differentiate")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    return params


def _loss_and_count(loss_fn: LossFn, batch: Any) -> tuple[torch.Tensor | None, float]:
    out = loss_fn(batch)
    if isinstance(out, tuple):
        loss, n = out
        n = float(n)
    else:
        loss, n = out, 1.0
    if n <= 0 or loss is None:
        return None, 0.0
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar mean loss, got shape {tuple(loss.shape)}")
    return loss, n


def _grads(
    outputs: torch.Tensor, params: list[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    gs = torch.autograd.grad(outputs, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vec: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        n = p.numel()
        out.append(vec[i:i + n].view_as(p).to(dtype=p.dtype, device=p.device))
        i += n
    return out


def _num_params(params: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- core

def hessian_vector_product(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    batches: Batches,
) -> list[torch.Tensor]:
    """``H v`` of the data-mean loss with respect to ``params``, streamed over ``batches``.

    ``vector`` is a list of tensors shaped like ``params``. Per batch: one forward, one backward
    with ``create_graph=True`` and one backward of ``<g, v>`` (Pearlmutter's double backward);
    results are weighted by the batch's sample count and divided by the total count.
    Returns a list of tensors shaped like ``params`` (detached). Raises ValueError if no batch
    has samples.
    """
    params = check_params(params)
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(f"vector has {len(vector)} tensors, params has {len(params)}")
    for i, (v, p) in enumerate(zip(vector, params, strict=True)):
        if v.shape != p.shape:
            raise ValueError(f"vector[{i}] has shape {tuple(v.shape)}, param {tuple(p.shape)}")
    vector = [v.to(device=p.device, dtype=p.dtype) for v, p in zip(vector, params, strict=True)]
    acc = [torch.zeros_like(p) for p in params]
    total = 0.0
    for batch in iterate_batches(batches):
        loss, n = _loss_and_count(loss_fn, batch)
        if loss is None:
            continue
        g = _grads(loss, params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vector, strict=True))
        if dot.requires_grad:
            hv = _grads(dot, params, create_graph=False)
        else:  # gradient independent of params (loss linear in them): H = 0
            hv = [torch.zeros_like(p) for p in params]
        for a, h in zip(acc, hv, strict=True):
            a.add_(h.detach(), alpha=n)
        total += n
    if total == 0:
        raise ValueError("no samples in batches")
    return [a / total for a in acc]


def _hvp_flat(
    loss_fn: LossFn, params: list[torch.Tensor], v: torch.Tensor, batches: Batches
) -> torch.Tensor:
    return _flat(hessian_vector_product(loss_fn, params, _unflat(v, params), batches)).to(v.dtype)


def _random_vector(params: list[torch.Tensor], gen: torch.Generator, kind: str) -> torch.Tensor:
    n = _num_params(params)
    dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
    if kind == "normal":
        v = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    else:
        raise ValueError(kind)
    return v.to(device=params[0].device, dtype=dtype)


def top_hessian_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    batches: Batches,
    k: int = 1,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "power",
    return_vectors: bool = False,
) -> list[float] | tuple[list[float], list[list[torch.Tensor]]]:
    """Top-``k`` Hessian eigenvalues of the data-mean loss.

    ``method="power"`` (default, memory ``O(k P)``): power iteration with deflation as in
    PyHessian -- each new vector is kept orthogonal to the eigenvectors already found; it stops
    when the Rayleigh quotient changes by less than ``tol`` relative, or after ``iters``
    Hessian-vector products. Power iteration converges to the eigenvalues of LARGEST MAGNITUDE
    (which, near a minimum, are the largest positive ones). Returned in the order found.

    ``method="lanczos"`` (memory ``O(iters * P)``): ``iters`` Lanczos steps with full
    re-orthogonalisation; returns the ``k`` largest (algebraic) Ritz values, descending.

    Returns a list of ``k`` floats (and the eigenvectors, lists of tensors shaped like
    ``params``, when ``return_vectors``). Deterministic given ``seed``.
    """
    params = check_params(params)
    P = _num_params(params)
    if not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}], got {k}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(int(seed))
    if method == "power":
        vals, vecs = _power_iteration(loss_fn, params, batches, k, iters, tol, gen)
    elif method == "lanczos":
        vals, vecs = _lanczos(loss_fn, params, batches, k, iters, gen)
    else:
        raise ValueError(f"unknown method {method!r}; valid: 'power', 'lanczos'")
    if return_vectors:
        return vals, [_unflat(v, params) for v in vecs]
    return vals


def _power_iteration(loss_fn, params, batches, k, iters, tol, gen):
    eigvals: list[float] = []
    eigvecs: list[torch.Tensor] = []

    def orthonormalise(v: torch.Tensor) -> torch.Tensor:
        for u in eigvecs:
            v = v - torch.dot(v, u) * u
        return v / (v.norm() + 1e-30)

    for _ in range(k):
        v = orthonormalise(_random_vector(params, gen, "normal"))
        value = None
        for _ in range(iters):
            hv = _hvp_flat(loss_fn, params, v, batches)
            new_value = float(torch.dot(hv, v))
            hv = orthonormalise(hv)
            converged = value is not None and abs(new_value - value) <= tol * (abs(value) + 1e-12)
            value = new_value
            if float(hv.norm()) == 0.0:   # H v = 0 in the deflated space: eigenvalue 0
                break
            v = hv
            if converged:
                break
        eigvals.append(float(value))
        eigvecs.append(v)
    return eigvals, eigvecs


def _lanczos(loss_fn, params, batches, k, iters, gen):
    P = _num_params(params)
    m = min(iters, P)
    v = _random_vector(params, gen, "normal").to(torch.float64)
    v = v / v.norm()
    Q = [v]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = _hvp_flat(loss_fn, params, Q[j].to(params[0].dtype), batches).to(torch.float64)
        alpha = float(torch.dot(w, Q[j]))
        alphas.append(alpha)
        # full re-orthogonalisation (twice, for stability)
        for _ in range(2):
            for q in Q:
                w = w - torch.dot(w, q) * q
        beta = float(w.norm())
        if j == m - 1 or beta < 1e-10:
            break
        betas.append(beta)
        Q.append(w / beta)
    T = np.diag(alphas)
    for i, b in enumerate(betas[: len(alphas) - 1]):
        T[i, i + 1] = T[i + 1, i] = b
    theta, S = np.linalg.eigh(T)
    order = np.argsort(theta)[::-1][:k]
    Qm = torch.stack(Q[: len(alphas)], dim=1)  # [P, m]
    vals = [float(theta[i]) for i in order]
    vecs = [
        (Qm @ torch.as_tensor(S[:, i], dtype=torch.float64, device=Qm.device)).to(params[0].dtype)
        for i in order
    ]
    if len(vals) < k:  # Krylov space exhausted (rank-deficient start); pad with zeros
        vals += [0.0] * (k - len(vals))
        vecs += [torch.zeros(P, dtype=params[0].dtype, device=params[0].device)] * (k - len(vecs))
    return vals, vecs


def hutchinson_trace(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    batches: Batches,
    samples: int = 50,
    seed: int = 0,
) -> tuple[float, float]:
    """Hutchinson estimate of ``tr(H)``: mean of ``v^T H v`` over Rademacher vectors ``v``.

    Returns ``(mean, stderr)`` where ``stderr = std(ddof=1) / sqrt(samples)`` (``nan`` for
    one sample). Unbiased; each sample costs one pass over the data.
    """
    params = check_params(params)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(samples):
        v = _random_vector(params, gen, "rademacher")
        vals.append(float(torch.dot(_hvp_flat(loss_fn, params, v, batches).double(), v.double())))
    arr = np.asarray(vals)
    stderr = float(arr.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
    return float(arr.mean()), stderr


def dense_hessian(
    loss_fn: LossFn, params: Sequence[torch.Tensor], batches: Batches, max_params: int = 4096
) -> torch.Tensor:
    """The full ``[P, P]`` Hessian (float64, on the CPU), one HVP per basis vector.

    For small problems and tests only: costs ``P`` passes over the data; refuses
    ``P > max_params``. Rows/columns follow ``params`` order, each flattened row-major.
    """
    params = check_params(params)
    P = _num_params(params)
    if P > max_params:
        raise ValueError(f"{P} parameters exceed max_params={max_params} for a dense Hessian")
    H = torch.zeros(P, P, dtype=torch.float64)
    for i in range(P):
        e = torch.zeros(P, dtype=params[0].dtype, device=params[0].device)
        e[i] = 1
        H[:, i] = _hvp_flat(loss_fn, params, e, batches).double().cpu()
    return H


def exact_hessian_trace(
    loss_fn: LossFn, params: Sequence[torch.Tensor], batches: Batches, max_params: int = 4096
) -> float:
    """Exact ``tr(H) = sum_i e_i^T H e_i`` over the full basis (``P`` passes; small P only)."""
    params = check_params(params)
    P = _num_params(params)
    if P > max_params:
        raise ValueError(f"{P} parameters exceed max_params={max_params} for an exact trace")
    total = 0.0
    for i in range(P):
        e = torch.zeros(P, dtype=params[0].dtype, device=params[0].device)
        e[i] = 1
        total += float(_hvp_flat(loss_fn, params, e, batches)[i])
    return total


def _mean_loss(loss_fn: LossFn, batches: Batches) -> float:
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in iterate_batches(batches):
            loss, n = _loss_and_count(loss_fn, batch)
            if loss is None:
                continue
            total += float(loss) * n
            count += n
    if count == 0:
        raise ValueError("no samples in batches")
    return total / count


def _mean_grad(
    loss_fn: LossFn, params: list[torch.Tensor], batches: Batches
) -> tuple[list[torch.Tensor], float]:
    acc = [torch.zeros_like(p) for p in params]
    total, loss_sum = 0.0, 0.0
    for batch in iterate_batches(batches):
        loss, n = _loss_and_count(loss_fn, batch)
        if loss is None:
            continue
        g = _grads(loss, params, create_graph=False)
        for a, gi in zip(acc, g, strict=True):
            a.add_(gi.detach(), alpha=n)
        total += n
        loss_sum += float(loss.detach()) * n
    if total == 0:
        raise ValueError("no samples in batches")
    return [a / total for a in acc], loss_sum / total


def first_order_terms(
    loss_fn: LossFn, params: list[torch.Tensor], batches: Batches, rho: float
) -> dict[str, float]:
    grads, loss0 = _mean_grad(loss_fn, params, batches)
    gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            scale = rho / (gnorm + 1e-12)
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=scale)
        loss_pert = _mean_loss(loss_fn, batches)
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)
    return {"sharpness": loss_pert - loss0, "loss": loss0, "perturbed_loss": loss_pert,
            "grad_norm": gnorm}


def first_order_sharpness(
    loss_fn: LossFn, params: Sequence[torch.Tensor], batches: Batches, rho: float = 0.05
) -> float:
    """SAM sharpness ``L(w + rho g / ||g||) - L(w)`` with ``g = grad L(w)`` (global L2 norm).

    One gradient pass and one forward-only pass; the weights are restored bit-exactly (from a
    copy) afterwards, even on error. Same units as the loss.
    """
    params = check_params(params)
    return first_order_terms(loss_fn, params, batches, rho)["sharpness"]
