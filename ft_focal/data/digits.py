"""The embedded demo: scikit-learn's bundled handwritten digits made long-tailed (no download).

`sklearn.datasets.load_digits()`: 1,797 real 8x8 grey images (values 0..16), 10 classes with
174..183 images each. The split is deterministic given the split seed (each class shuffled):

* test: 30 images per class (300, balanced);
* val:  10 images per class (100, balanced);
* train: from the remaining pool (at least 134 per class), the exp long-tail profile with
  n_max = 134 and imbalance factor `data.imbalance_factor` (default 10 when null):

      class     0    1   2   3   4   5   6   7   8   9     total
      count   134  103  80  62  48  37  28  22  17  13  =  544

  so with the default thresholds (many > 100, few < 20) the classes fall in all three shot
  groups: many {0, 1}, medium {2..7}, few {8, 9}.

Pixels are scaled from 0..16 to 0..255 (uint8); images are grey and become 3-channel RGB at
load; class names are the English words "zero".."nine". The recipe's transforms upscale them
to the model's image size (bicubic) and normalise with its mean / std. Digits should not be
flipped and RandomResizedCrop's default scale (0.08..1) keeps too little of an 8x8 digit: a
demo recipe should set `data.hflip: false` and e.g. `data.train_crop_scale: [0.6, 1.0]`.
"""

from __future__ import annotations

import numpy as np

from ft_focal.data.longtail import longtail_counts
from ft_focal.errors import UserError

TEST_PER_CLASS = 30
VAL_PER_CLASS = 10
N_MAX = 134
DEFAULT_IMBALANCE = 10.0
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_lt(imbalance_factor: float | None, seed: int, profile: str = "exp"):
    """(splits, classnames, train_counts) with splits = {name: (images uint8 [N,8,8], labels)}."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise UserError("data.dataset=digits_lt needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    num_classes = 10
    factor = DEFAULT_IMBALANCE if imbalance_factor is None else imbalance_factor
    counts = longtail_counts(N_MAX, num_classes, factor, profile)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        parts["test"].append(idx[:TEST_PER_CLASS])
        parts["val"].append(idx[TEST_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS])
        pool = idx[TEST_PER_CLASS + VAL_PER_CLASS:]
        parts["train"].append(pool[:counts[c]])
    splits = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        splits[name] = (images[idx], labels[idx])
    classnames = list(DIGIT_NAMES)
    return splits, classnames, counts
