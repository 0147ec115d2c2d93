"""Class counts and long-tailed subsampling of a balanced dataset.

`longtail_counts` follows the CIFAR-LT convention of Cao et al. (LDAM-DRW) and Cui et al.,
which the Focal-SAM / LIFT / ImbSAM codes reuse:

* exp:  n_c = int(n_max * (1 / IF) ** (c / (C - 1)))  (truncated; CIFAR-10 IF 100 gives
  5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 and CIFAR-100 IF 100 sums to 10847);
* step: the first C // 2 classes keep n_max, the others int(n_max / IF).

Class 0 is the most frequent. Every count is at least 1. `subsample_longtail` keeps the first
n_c images of each class in an order shuffled with a given seed (LDAM shuffles each class with
seed 0 and keeps the first n_c).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from ft_focal.errors import UserError

log = logging.getLogger(__name__)


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Per-class counts of a long-tailed split (class 0 the largest), see the module docstring."""
    if imbalance_factor is None or not imbalance_factor >= 1:
        raise UserError(f"data.imbalance_factor must be >= 1 (n_max / n_min), got {imbalance_factor}")
    if n_max < 1 or num_classes < 1:
        raise UserError(f"long-tailed counts need n_max >= 1 and num_classes >= 1, got {n_max}, {num_classes}")
    ratio = 1.0 / float(imbalance_factor)
    if profile == "exp":
        if num_classes == 1:
            counts = [int(n_max)]
        else:
            counts = [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    elif profile == "step":
        head = num_classes // 2 if num_classes > 1 else 1
        counts = [int(n_max) if c < head else int(n_max * ratio) for c in range(num_classes)]
    else:
        raise UserError(f"data.imbalance_profile: {profile!r} is not one of exp, step")
    return [max(1, n) for n in counts]


def class_counts_from_labels(labels: Iterable[int], num_classes: int) -> list[int]:
    """Number of samples per class (index = label); classes without samples count 0."""
    labels = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def subsample_longtail(labels: Sequence[int], counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices (sorted) keeping the first counts[c] samples of each class in a seeded order.

    A class with fewer samples than asked keeps all of them (logged).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    short = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if len(idx) < n_c:
            short.append((c, len(idx), n_c))
        keep.append(idx[:n_c])
    if short:
        c, have, want = short[0]
        log.warning("long-tailed subsampling: %d class(es) have fewer images than the profile asks "
                    "(e.g. class %d: %d < %d); they keep all their images", len(short), c, have, want)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def stratified_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices: `fraction` of each class held out as a validation split.

    A class of n >= 2 images gives max(1, round(fraction * n)) of them, at most n - 1 (every class
    keeps a training image and appears in the validation split); a class of one image gives none.
    Each class is shuffled with its own generator seeded by (seed, class), so the split of a class
    does not depend on the other classes. Both index arrays are sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        order = np.random.default_rng([int(seed), int(label)]).permutation(len(members))
        held.append(members[order[:take]])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out
