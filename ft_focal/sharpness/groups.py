"""Sharpness by group of classes (many / medium / few shots, or single classes): the Hessian
diagnostics of ft_focal/sharpness/hessian.py on each group's own mean training loss.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ft_focal.sharpness.hessian import (
    Batches,
    LossFn,
    check_params,
    first_order_terms,
    hutchinson_trace,
    iterate_batches,
    top_hessian_eigenvalues,
)

__all__ = ["group_sharpness", "shot_group_classes", "collect_per_class_trace"]


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


def _wanted_classes(per_class_trace: bool | Iterable[int] | None) -> set[int] | None:
    """Classes that get their own trace; None means every class of every group."""
    if per_class_trace is True:
        return None
    if per_class_trace is False or per_class_trace is None:
        return set()
    return {int(c) for c in per_class_trace}


def _count_samples(data_batches: Batches, classes: set[int]) -> int:
    ids = torch.tensor(sorted(classes), dtype=torch.long)
    return sum(int(torch.isin(torch.as_tensor(b[1]).cpu(), ids).sum())
               for b in iterate_batches(data_batches))


def _per_class_traces(
    model: nn.Module,
    params: list[torch.Tensor],
    data_batches: Batches,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    class_ids: list[int],
    samples: int,
    seed: int,
    dev: torch.device,
) -> dict[str, dict[str, Any]]:
    pcs: dict[str, dict[str, Any]] = {}
    for c in class_ids:
        nc = _count_samples(data_batches, {c})
        if nc == 0:
            pcs[str(c)] = {"trace": None, "trace_stderr": None, "num_samples": 0}
            continue
        t, s = hutchinson_trace(_class_loss_fn(model, criterion, {c}, dev), params,
                                data_batches, samples=samples, seed=seed)
        pcs[str(c)] = {"trace": t, "trace_stderr": _nan_to_none(s), "num_samples": nc}
    return pcs


def _group_measures(
    fn: LossFn,
    params: list[torch.Tensor],
    data_batches: Batches,
    *,
    k: int,
    iters: int,
    tol: float,
    trace_samples: int,
    rho: float,
    seed: int,
) -> dict[str, Any]:
    """Eigenvalues, Hutchinson trace and first-order (SAM) terms of one group's loss."""
    entry: dict[str, Any] = {}
    entry["eigenvalues"] = top_hessian_eigenvalues(fn, params, data_batches, k=k, iters=iters, tol=tol, seed=seed)
    tr, se = hutchinson_trace(fn, params, data_batches, samples=trace_samples, seed=seed)
    entry["trace"], entry["trace_stderr"] = tr, _nan_to_none(se)
    fo = first_order_terms(fn, params, data_batches, rho)
    entry["sam_sharpness"], entry["loss"], entry["grad_norm"] = fo["sharpness"], fo["loss"], fo["grad_norm"]
    return entry


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
    params = check_params(params)
    dev = torch.device(device) if device is not None else params[0].device
    wanted = _wanted_classes(per_class_trace)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, classes in groups.items():
            classes = {int(c) for c in classes}
            n = _count_samples(data_batches, classes) if classes else 0
            entry: dict[str, Any] = {"num_samples": n, "num_classes": len(classes)}
            if n == 0:
                entry.update(eigenvalues=None, trace=None, trace_stderr=None,
                             sam_sharpness=None, loss=None, grad_norm=None)
                results[str(name)] = entry
                continue
            fn = _class_loss_fn(model, criterion, classes, dev)
            entry.update(_group_measures(fn, params, data_batches, k=k, iters=iters, tol=tol,
                                         trace_samples=trace_samples, rho=rho, seed=seed))
            per_class_ids = sorted(classes if wanted is None else classes & wanted)
            if per_class_ids:
                entry["per_class_trace"] = _per_class_traces(model, params, data_batches, criterion, per_class_ids,
                                                             per_class_samples, seed, dev)
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
