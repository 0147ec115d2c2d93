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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "hessian_vector_product",
    "top_hessian_eigenvalues",
    "hutchinson_trace",
    "exact_hessian_trace",
    "dense_hessian",
    "first_order_sharpness",
    "group_sharpness",
    "shot_group_classes",
    "collect_per_class_trace",
]

Batches = Iterable[Any] | Callable[[], Iterable[Any]]
LossFn = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, int]"]


# ----------------------------------------------------------------------------- helpers

def _iterate(batches: Batches) -> Iterator[Any]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return iter(batches())
    it = iter(batches)
    if it is batches:
        raise ValueError(
            "batches is a one-shot iterator; pass a list / DataLoader or a callable that "
            "returns a fresh iterator (the data is traversed many times)"
        )
    return it


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


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
    params = _check_params(params)
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(f"vector has {len(vector)} tensors, params has {len(params)}")
    for i, (v, p) in enumerate(zip(vector, params)):
        if v.shape != p.shape:
            raise ValueError(f"vector[{i}] has shape {tuple(v.shape)}, param {tuple(p.shape)}")
    vector = [v.to(device=p.device, dtype=p.dtype) for v, p in zip(vector, params)]
    acc = [torch.zeros_like(p) for p in params]
    total = 0.0
    for batch in _iterate(batches):
        loss, n = _loss_and_count(loss_fn, batch)
        if loss is None:
            continue
        g = _grads(loss, params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vector))
        if dot.requires_grad:
            hv = _grads(dot, params, create_graph=False)
        else:  # gradient independent of params (loss linear in them): H = 0
            hv = [torch.zeros_like(p) for p in params]
        for a, h in zip(acc, hv):
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
    params = _check_params(params)
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
    params = _check_params(params)
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
    params = _check_params(params)
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
    params = _check_params(params)
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
        for batch in _iterate(batches):
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
    for batch in _iterate(batches):
        loss, n = _loss_and_count(loss_fn, batch)
        if loss is None:
            continue
        g = _grads(loss, params, create_graph=False)
        for a, gi in zip(acc, g):
            a.add_(gi.detach(), alpha=n)
        total += n
        loss_sum += float(loss.detach()) * n
    if total == 0:
        raise ValueError("no samples in batches")
    return [a / total for a in acc], loss_sum / total


def _first_order(
    loss_fn: LossFn, params: list[torch.Tensor], batches: Batches, rho: float
) -> dict[str, float]:
    grads, loss0 = _mean_grad(loss_fn, params, batches)
    gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            scale = rho / (gnorm + 1e-12)
            for p, g in zip(params, grads):
                p.add_(g, alpha=scale)
        loss_pert = _mean_loss(loss_fn, batches)
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
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
    params = _check_params(params)
    return _first_order(loss_fn, params, batches, rho)["sharpness"]


# ----------------------------------------------------------------------------- groups

def shot_group_classes(
    class_counts: Sequence[int], many: int = 100, few: int = 20
) -> dict[str, set[int]]:
    """``{"many": {...}, "medium": {...}, "few": {...}}`` class-id sets from TRAINING counts
    (same rule as :func:`ft_focal.metrics.shot_groups`); empty groups are dropped."""
    from ft_focal.metrics import shot_groups

    groups = shot_groups(class_counts, many=many, few=few)
    out = {g: {int(c) for c in np.nonzero(groups == g)[0]} for g in ("many", "medium", "few")}
    return {g: s for g, s in out.items() if s}


def _class_loss_fn(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classes: set[int],
    device: torch.device,
) -> LossFn:
    class_ids = torch.tensor(sorted(classes), dtype=torch.long)

    def loss_fn(batch: Any) -> tuple[torch.Tensor | None, int]:
        images, labels = batch[0], batch[1]
        labels = torch.as_tensor(labels)
        mask = torch.isin(labels.cpu(), class_ids)
        n = int(mask.sum())
        if n == 0:
            return None, 0
        mask_dev = mask.to(labels.device)
        x = images[mask_dev.to(images.device)].to(device)
        y = labels[mask_dev].to(device)
        per_sample = criterion(model(x), y)
        return per_sample.mean(), n

    return loss_fn


def group_sharpness(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    data_batches: Batches,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    groups: Mapping[str, Iterable[int]],
    *,
    k: int = 1,
    iters: int = 50,
    tol: float = 1e-4,
    trace_samples: int = 50,
    rho: float = 0.05,
    seed: int = 0,
    per_class_trace: bool | Iterable[int] = False,
    per_class_samples: int = 10,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Sharpness of each group's own loss ``L_G(w) = mean_{j: y_j in G} l_j(w)``.

    Args:
        model: maps an image batch to logits ``[b, C]``; put in eval mode during the call.
        params: the parameters the Hessian / perturbation is taken over (requires_grad).
        data_batches: re-iterable of ``(images, labels)`` batches or a callable returning a fresh
            iterator (each group streams it ``~ k*iters + trace_samples + 2`` times). Only the
            group's samples are forwarded.
        criterion: per-sample loss ``criterion(logits [b, C], labels [b]) -> [b]`` (e.g. a loss
            from :mod:`ft_focal.losses`).
        groups: group name -> class ids, e.g. :func:`shot_group_classes` or ``{"cls3": {3}}``.
        k, iters, tol: top Hessian eigenvalues (power iteration, see
            :func:`top_hessian_eigenvalues`).
        trace_samples: Rademacher vectors for the Hutchinson trace.
        rho: radius of the first-order (SAM) sharpness.
        seed: every group uses the same seed (common random vectors), so results are
            deterministic and groups are compared with correlated noise.
        per_class_trace: ``True`` (every class of every group) or an iterable of class ids:
            additionally estimates each class's own Hessian trace with ``per_class_samples``
            vectors (one data pass per vector per class -- expensive for many classes).
        device: where batches are moved; default the device of ``params[0]``.

    Returns a JSON-serialisable ``{group: {"eigenvalues": [k floats], "trace": float,
    "trace_stderr": float, "sam_sharpness": float, "loss": float, "grad_norm": float,
    "num_samples": int, "num_classes": int[, "per_class_trace": {str(class): {"trace",
    "trace_stderr", "num_samples"}}]}}``. A group without samples gets ``num_samples = 0``
    and ``None`` for every quantity. Model mode and weights are restored afterwards.
    """
    params = _check_params(params)
    dev = torch.device(device) if device is not None else params[0].device
    if per_class_trace is True:
        wanted: set[int] | None = None
    elif per_class_trace is False or per_class_trace is None:
        wanted = set()
    else:
        wanted = {int(c) for c in per_class_trace}

    def count(classes: set[int]) -> int:
        ids = torch.tensor(sorted(classes), dtype=torch.long)
        return sum(int(torch.isin(torch.as_tensor(b[1]).cpu(), ids).sum())
                   for b in _iterate(data_batches))

    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, classes in groups.items():
            classes = {int(c) for c in classes}
            n = count(classes) if classes else 0
            entry: dict[str, Any] = {"num_samples": n, "num_classes": len(classes)}
            if n == 0:
                entry.update(eigenvalues=None, trace=None, trace_stderr=None,
                             sam_sharpness=None, loss=None, grad_norm=None)
                results[str(name)] = entry
                continue
            fn = _class_loss_fn(model, criterion, classes, dev)
            entry["eigenvalues"] = top_hessian_eigenvalues(
                fn, params, data_batches, k=k, iters=iters, tol=tol, seed=seed)
            tr, se = hutchinson_trace(fn, params, data_batches, samples=trace_samples, seed=seed)
            entry["trace"], entry["trace_stderr"] = tr, _nan_to_none(se)
            fo = _first_order(fn, params, data_batches, rho)
            entry["sam_sharpness"], entry["loss"], entry["grad_norm"] = (
                fo["sharpness"], fo["loss"], fo["grad_norm"])
            per_class_ids = sorted(classes if wanted is None else classes & wanted)
            if per_class_ids:
                pcs: dict[str, dict[str, Any]] = {}
                for c in per_class_ids:
                    nc = count({c})
                    if nc == 0:
                        pcs[str(c)] = {"trace": None, "trace_stderr": None, "num_samples": 0}
                        continue
                    t, s = hutchinson_trace(_class_loss_fn(model, criterion, {c}, dev), params,
                                            data_batches, samples=per_class_samples, seed=seed)
                    pcs[str(c)] = {"trace": t, "trace_stderr": _nan_to_none(s), "num_samples": nc}
                entry["per_class_trace"] = pcs
            results[str(name)] = entry
    finally:
        model.train(was_training)
    return results


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def collect_per_class_trace(group_results: Mapping[str, Mapping[str, Any]]) -> dict[int, float]:
    """Flatten the ``per_class_trace`` entries of :func:`group_sharpness` results into
    ``{class_id: trace}`` (classes without samples are skipped)."""
    out: dict[int, float] = {}
    for entry in group_results.values():
        for c, v in (entry.get("per_class_trace") or {}).items():
            if v.get("trace") is not None:
                out[int(c)] = float(v["trace"])
    return out
