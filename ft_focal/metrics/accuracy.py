"""Long-tail accuracy by shot group and calibration (docs/metrics.md).

Accuracies and the calibration error are FRACTIONS in [0, 1]; inputs are numpy arrays or torch tensors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if hasattr(x, "float") and x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ----------------------------------------------------------------------------- long tail

def shot_groups(class_counts: Sequence[int], many: int = 100, few: int = 20) -> np.ndarray:
    """Shot group of every class from its TRAINING count.

    ``"many"`` if ``n_c > many``, ``"few"`` if ``n_c < few``, ``"medium"`` otherwise (so
    ``n_c = 100`` and ``n_c = 20`` are both medium). Returns a string array of shape ``[C]``.
    """
    counts = _to_numpy(class_counts).astype(np.float64).reshape(-1)
    if few > many:
        raise ValueError(f"few threshold ({few}) must not exceed many threshold ({many})")
    groups = np.full(counts.shape, "medium", dtype=object)
    groups[counts > many] = "many"
    groups[counts < few] = "few"
    return groups.astype(str)


def long_tail_accuracy(
    predictions_or_logits: Any,
    labels: Any,
    class_counts: Sequence[int],
    num_classes: int | None = None,
    many: int = 100,
    few: int = 20,
) -> dict[str, Any]:
    """Overall and shot-group top-1 accuracy.

    Args:
        predictions_or_logits: predicted class ids ``[N]`` (integers) or scores ``[N, C]``
            (logits or probabilities; the argmax is taken).
        labels: true class ids ``[N]``.
        class_counts: TRAINING count per class ``[C]`` (defines the shot groups).
        num_classes: ``C``; defaults to ``len(class_counts)`` and must agree with it.
        many, few: shot-group thresholds (see :func:`shot_groups`).

    Returns a JSON-serialisable dict (fractions in [0, 1]):
        ``overall``: plain sample accuracy (correct / N).
        ``many`` / ``medium`` / ``few``: mean over the group's classes of the per-class accuracy
            (the convention of Decoupling's and LIFT's ``shot_acc``); classes without test
            samples are left out; ``None`` when no class of the group has a test sample.
        ``mean_per_class``: mean per-class accuracy over all classes with test samples.
        ``per_class``: list of ``C`` per-class accuracies, ``None`` for classes without test
            samples.
        ``group_num_classes``: number of classes with test samples per group.
        ``num_samples``: N.
    """
    counts = _to_numpy(class_counts).reshape(-1)
    C = int(counts.size) if num_classes is None else int(num_classes)
    if counts.size != C:
        raise ValueError(f"class_counts has {counts.size} entries but num_classes is {C}")
    scores = _to_numpy(predictions_or_logits)
    if scores.ndim == 2:
        if scores.shape[1] != C:
            raise ValueError(f"logits have {scores.shape[1]} columns, expected {C} classes")
        preds = scores.argmax(axis=1)
    elif scores.ndim == 1:
        preds = scores
        if preds.size and not np.all(np.equal(np.mod(preds, 1), 0)):
            raise ValueError("1-D predictions must be integer class ids")
        preds = preds.astype(np.int64)
    else:
        raise ValueError(f"predictions must be [N] or [N, C], got shape {scores.shape}")
    y = _to_numpy(labels).reshape(-1).astype(np.int64)
    if y.shape[0] != preds.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"labels must be in [0, {C}), found {y.min()}..{y.max()}")

    correct = preds == y
    total_c = np.bincount(y, minlength=C).astype(np.float64)
    correct_c = np.bincount(y, weights=correct.astype(np.float64), minlength=C)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total_c > 0, correct_c / np.maximum(total_c, 1), np.nan)

    groups = shot_groups(counts, many=many, few=few)
    result: dict[str, Any] = {
        "overall": float(correct.mean()) if y.size else None,
    }
    group_num: dict[str, int] = {}
    for g in ("many", "medium", "few"):
        vals = per_class[(groups == g) & (total_c > 0)]
        group_num[g] = int(vals.size)
        result[g] = float(vals.mean()) if vals.size else None
    valid = per_class[total_c > 0]
    result["mean_per_class"] = float(valid.mean()) if valid.size else None
    result["per_class"] = [_none_if_nan(float(a)) for a in per_class]
    result["group_num_classes"] = group_num
    result["num_samples"] = int(y.size)
    return result


def expected_calibration_error(
    logits_or_probs: Any, labels: Any, n_bins: int = 15, inputs: str = "auto"
) -> float:
    """Expected calibration error (Guo et al., 2017) of top-1 confidence, as a fraction.

    ``ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width bins
    ``(k/n, (k+1)/n]`` of the max softmax probability.

    Args:
        logits_or_probs: ``[N, C]`` scores.
        labels: ``[N]`` class ids.
        inputs: ``"logits"`` (softmax applied), ``"probs"`` (used as is) or ``"auto"``
            (probabilities if every row is non-negative and sums to 1 within 1e-4).
    """
    scores = _to_numpy(logits_or_probs).astype(np.float64)
    y = _to_numpy(labels).reshape(-1).astype(np.int64)
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {scores.shape} and {y.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if inputs not in ("auto", "logits", "probs"):
        raise ValueError(f"inputs must be 'auto', 'logits' or 'probs', got {inputs!r}")
    if y.size == 0:
        return 0.0
    is_prob = inputs == "probs" or (
        inputs == "auto" and scores.min() >= 0 and np.allclose(scores.sum(1), 1.0, atol=1e-4)
    )
    if is_prob:
        probs = scores
    else:
        z = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    # bin k holds confidences in (k/n, (k+1)/n]; confidence 0 (impossible for a softmax) -> bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        m = idx == k
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
