"""Map-style datasets of every source and the `DataBundle` the training loop consumes.

Every dataset returns `(image_tensor [3, H, W] float, label int)` (with the five-crop test
transform: `[5, 3, H, W]`) and exposes `labels` (numpy int64, one per item, in label order of
the bundle). Construction is deterministic and uses no global random state.

Bad images: by default a missing / corrupt image raises `DataError` naming the file (and the
list line). With `data.skip_bad_images: true` the dataset returns `None` for it instead, logs a
warning the first time it meets that file, and marks it in a per-item flag array in shared
memory (a torch tensor), so that files met inside DataLoader worker processes count too:
`dataset.bad_count` is the number of distinct unreadable FILES, however often each is drawn
(`bad_indices()` / `mark_bad()` carry them across a resume). Use
`collate_skip_bad` (also `bundle.collate_fn`) as the DataLoader's collate_fn: it drops the
`None` samples (and returns `None` when a whole batch is bad).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ft_focal.data.images import DataError, array_to_pil, open_rgb, to_rgb
from ft_focal.data.longtail import class_counts_from_labels, longtail_counts
from ft_focal.data.transforms import build_five_crop_transform, build_transform
from ft_focal.errors import UserError

log = logging.getLogger(__name__)

_MAX_BAD_WARNINGS = 50  # per split and process; every further bad file is still counted


def _new_flags(n: int) -> torch.Tensor:
    """One byte per item in shared memory (1 = unreadable): visible to the main process whatever the
    worker start method (fork, spawn, forkserver), since torch shares such tensors with its workers."""
    return torch.zeros(max(1, n), dtype=torch.uint8).share_memory_()


class LabelledImages(Dataset):
    """Base class: subclasses implement `load_image(i) -> PIL RGB` and `subset(indices)`."""

    def __init__(self, labels: Sequence[int], transform: Optional[Callable] = None,
                 skip_bad: bool = False, name: str = "data"):
        self.skip_bad = bool(skip_bad)
        self._bad: Optional[torch.Tensor] = None
        self.labels = labels  # allocates the bad-file flags (see the setter)
        self.transform = transform
        self.name = name
        self._warned = 0

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @labels.setter
    def labels(self, value) -> None:
        # a subset / remap gives other items: the flags follow the items (set before any worker starts)
        self._labels = np.asarray(value, dtype=np.int64)
        self._bad = _new_flags(len(self._labels)) if self.skip_bad else None

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where item i comes from (a file path, a dataset row), for messages."""
        return f"{self.name}[{i}]"

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        try:
            img = self.load_image(i)
        except DataError as exc:
            if not self.skip_bad:
                raise
            self._record_bad(i, exc)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def _record_bad(self, i: int, exc: Exception) -> None:
        if self._bad[i]:
            return  # met before (an earlier epoch, another worker): logged and counted once
        self._bad[i] = 1  # items are split between workers: no two write the same flag at once
        self._warned += 1
        if self._warned <= _MAX_BAD_WARNINGS:
            more = " (further bad files of this split in this process are counted, not logged)" \
                if self._warned == _MAX_BAD_WARNINGS else ""
            log.warning("skipping bad image: %s%s", exc, more)

    @property
    def bad_count(self) -> int:
        """Distinct unreadable files met so far (all processes sharing this dataset; 0 without skip_bad)."""
        return int(self._bad.sum()) if self._bad is not None else 0

    def bad_indices(self) -> list[int]:
        """The items found unreadable so far, in order (what a checkpoint records)."""
        return [] if self._bad is None else torch.nonzero(self._bad).flatten().tolist()

    def mark_bad(self, indices: Sequence[int]) -> None:
        """Mark items found unreadable before a resume: neither logged nor counted again."""
        if self._bad is not None:
            for i in indices:
                if 0 <= int(i) < len(self):
                    self._bad[int(i)] = 1

    def _copy(self) -> "LabelledImages":
        new = copy.copy(self)
        new._bad = _new_flags(len(self)) if self.skip_bad else None
        new._warned = 0
        return new

    def with_transform(self, transform: Optional[Callable]) -> "LabelledImages":
        """A shallow copy with another transform (and its own skipped-image counter)."""
        new = self._copy()
        new.transform = transform
        return new

    def remap_labels(self, new_of_old: np.ndarray) -> None:
        self.labels = np.asarray(new_of_old, dtype=np.int64)[self.labels]

    def subset(self, indices: Sequence[int]) -> "LabelledImages":  # pragma: no cover - abstract
        raise NotImplementedError


class FileListDataset(LabelledImages):
    """Images on disk: `root/path` per item (split lists, image folders)."""

    def __init__(self, root: str, paths: np.ndarray, labels, origin: Optional[str] = None,
                 lines: Optional[np.ndarray] = None, **kw):
        super().__init__(labels, **kw)
        self.root = os.fspath(root) if root is not None else ""
        self.paths = np.asarray(paths)
        self.origin = origin  # the list file the paths came from, if any
        self.lines = lines

    def file(self, i: int) -> str:
        p = self.paths[i]
        p = p.decode("utf-8") if isinstance(p, bytes) else str(p)
        return os.path.join(self.root, p)

    def describe(self, i: int) -> str:
        return self.file(i)

    def origin_of(self, i: int) -> Optional[str]:
        if self.origin is None:
            return None
        if self.lines is not None:
            return f"listed in {self.origin} line {int(self.lines[i])}"
        return f"listed in {self.origin}"

    def load_image(self, i: int):
        return open_rgb(self.file(i), self.origin_of(i))

    def subset(self, indices):
        new = self._copy()
        idx = np.asarray(indices, dtype=np.int64)
        new.paths, new.labels = self.paths[idx], self.labels[idx]
        new.lines = self.lines[idx] if self.lines is not None else None
        return new


class ArrayDataset(LabelledImages):
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, C] (digits, CIFAR)."""

    def __init__(self, images: np.ndarray, labels, **kw):
        super().__init__(labels, **kw)
        self.images = images

    def load_image(self, i: int):
        return array_to_pil(self.images[i], self.describe(i))

    def subset(self, indices):
        new = self._copy()
        idx = np.asarray(indices, dtype=np.int64)
        new.images, new.labels = self.images[idx], self.labels[idx]
        return new


class HFImageDataset(LabelledImages):
    """One split of a Hugging Face `datasets.Dataset`; labels read once, images decoded per item."""

    def __init__(self, hf_dataset, image_key: str, labels, **kw):
        super().__init__(labels, **kw)
        self.hf = hf_dataset.select_columns([image_key])
        self.image_key = image_key

    def load_image(self, i: int):
        try:
            value = self.hf[i][self.image_key]
        except Exception as exc:  # decoding errors surface here (PIL / arrow)
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{self.describe(i)}: cannot decode the image ({text})") from None
        return hf_value_to_pil(value, self.describe(i))

    def subset(self, indices):
        new = self._copy()
        idx = np.asarray(indices, dtype=np.int64)
        new.hf, new.labels = self.hf.select(idx.tolist()), self.labels[idx]
        return new


def hf_value_to_pil(value: Any, name: str):
    """An image cell of a HF dataset (PIL image, array, tensor, {'bytes','path'}) as RGB PIL."""
    from PIL import Image

    if isinstance(value, Image.Image):
        try:
            value.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{name}: corrupt image ({' '.join(str(exc).split())})") from None
        return to_rgb(value, name)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            import io

            try:
                with Image.open(io.BytesIO(value["bytes"])) as img:
                    img.load()
                    return to_rgb(img, name)
            except (OSError, SyntaxError, ValueError) as exc:
                raise DataError(f"{name}: corrupt image ({' '.join(str(exc).split())})") from None
        if value.get("path"):
            return open_rgb(value["path"], name)
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, (np.ndarray, list)):
        return array_to_pil(np.asarray(value), name)
    raise DataError(f"{name}: the image column holds {type(value).__name__}, not an image")


class SyntheticDataset(LabelledImages):
    """Random tensors with a class-dependent colour offset (learnable), generated per index.

    Items are already tensors of the model's size (no transform); `five_crop=True` returns
    [5, 3, H, W] (five shifted copies). Deterministic in (seed, index), whatever the worker.
    """

    def __init__(self, labels, image_size: int, seed: int, five_crop: bool = False, **kw):
        super().__init__(labels, **kw)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.five_crop = five_crop

    def _class_offset(self, c: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * 7919 + c)
        return torch.randn(3, 1, 1, generator=g)

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.image_size
        label = int(self.labels[i])
        img = torch.randn(3, s, s, generator=g) + self._class_offset(label)
        if self.five_crop:
            img = torch.stack([torch.roll(img, shifts=(k, k), dims=(1, 2)) for k in range(5)])
        return img, label

    def load_image(self, i: int):  # a PIL view, for completeness (check-data)
        from torchvision.transforms.functional import to_pil_image

        x = self[i][0]
        x = x[0] if x.dim() == 4 else x
        return to_pil_image(((x - x.min()) / (x.max() - x.min() + 1e-12)).clamp(0, 1))

    def subset(self, indices):
        new = self._copy()
        new.labels = self.labels[np.asarray(indices, dtype=np.int64)]
        return new


def collate_skip_bad(batch):
    """DataLoader collate_fn that drops the `None` samples of bad images (skip_bad_images).

    Returns the default-collated batch of the remaining samples, or `None` when every sample of
    the batch was bad (the loop should skip such a batch). The count of skipped images is kept
    by each dataset (`dataset.bad_count`, shared across worker processes).
    """
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


@dataclass
class DataBundle:
    """Everything the loop needs about the data. See `build_datasets`."""

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    class_counts: list
    classnames: list
    num_classes: int
    wnids: Optional[list] = None
    splits_info: dict = field(default_factory=dict)
    collate_fn: Optional[Callable] = None  # collate_skip_bad with data.skip_bad_images, else None
    eval_transform: Optional[Callable] = None
    five_crop_transform: Optional[Callable] = None

    def split(self, name: str) -> Optional[Dataset]:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown data split '{name}' (valid: train, val, test)")
        return getattr(self, name)

    def eval_dataset(self, name: str, five_crop: bool = False) -> Optional[Dataset]:
        """Split `name` with the test-time transform (five_crop: LIFT's 5-crop -> [5, 3, H, W])."""
        ds = self.split(name)
        if ds is None:
            return None
        if isinstance(ds, SyntheticDataset):
            new = ds._copy()
            new.five_crop = bool(five_crop)
            return new
        if not isinstance(ds, LabelledImages):  # a user-supplied dataset: use as is
            return ds
        return ds.with_transform(self.five_crop_transform if five_crop else self.eval_transform)

    def skipped_images(self) -> dict:
        """Bad images skipped so far per split (only non-zero with data.skip_bad_images)."""
        return {n: getattr(getattr(self, n), "bad_count", 0) for n in ("train", "val", "test")
                if getattr(self, n) is not None}


# --------------------------------------------------------------------------------------------
# assembling a bundle


def _warn_empty_classes(counts: list, classnames: list) -> int:
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        examples = ", ".join(repr(classnames[c]) for c in empty[:5])
        log.warning("%d of %d classes have no training images (e.g. %s); they stay in the model's "
                    "head and are reported with the few-shot group", len(empty), len(counts), examples)
    return len(empty)


def finish_bundle(train: LabelledImages, val: Optional[LabelledImages], test: LabelledImages,
                  classnames: list, wnids: Optional[list], preprocess: dict, data_cfg,
                  info: dict, class_counts: Optional[list] = None) -> DataBundle:
    """Attach transforms, count classes (unless `class_counts` is given), fill `splits_info`."""
    num_classes = len(classnames)
    train_tf = build_transform(preprocess, data_cfg, train=True)
    test_tf = build_transform(preprocess, data_cfg, train=False)
    five_tf = build_five_crop_transform(preprocess, data_cfg)
    if not isinstance(train, SyntheticDataset):
        train = train.with_transform(train_tf)
        val = val.with_transform(test_tf) if val is not None else None
        test = test.with_transform(test_tf)
    counts = class_counts_from_labels(train.labels, num_classes) if class_counts is None else list(class_counts)
    n_empty = _warn_empty_classes(counts, classnames)
    info = dict(info)
    info.update(
        num_classes=num_classes,
        sizes={"train": len(train), "val": len(val) if val is not None else 0, "test": len(test)},
        train_images=len(train),
        empty_train_classes=n_empty,
        max_class_count=int(max(counts)) if counts else 0,
        min_class_count=int(min(counts)) if counts else 0,
        imbalance_ratio=(float(max(counts)) / max(1, min(c for c in counts if c > 0))) if any(counts) else 0.0,
        transforms={"train": repr(train_tf).replace("\n", " "), "test": repr(test_tf).replace("\n", " ")}
        if not isinstance(train, SyntheticDataset) else {"train": "synthetic tensors", "test": "synthetic tensors"},
        skip_bad_images=bool(getattr(data_cfg, "skip_bad_images", False)),
    )
    return DataBundle(
        train=train, val=val, test=test, class_counts=counts, classnames=list(classnames),
        num_classes=num_classes, wnids=list(wnids) if wnids is not None else None, splits_info=info,
        collate_fn=collate_skip_bad if getattr(data_cfg, "skip_bad_images", False) else None,
        eval_transform=test_tf, five_crop_transform=five_tf,
    )


def spread_counts(total: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """`total` samples spread over classes along the exp long-tail profile (largest remainder).

    When total >= num_classes every class gets at least one sample.
    """
    C = int(num_classes)
    ratio = 1.0 / max(1.0, float(imbalance_factor))
    w = np.array([ratio ** (c / (C - 1.0)) if C > 1 else 1.0 for c in range(C)])
    base = np.ones(C, dtype=np.int64) if total >= C else np.zeros(C, dtype=np.int64)
    rest = total - int(base.sum())
    share = w / w.sum() * rest
    add = np.floor(share).astype(np.int64)
    left = rest - int(add.sum())
    order = np.argsort(-(share - add), kind="stable")
    add[order[:left]] += 1
    return (base + add).tolist()


SYNTHETIC_N_MAX = 500


def synthetic_bundle(num_classes: int, preprocess: dict, train_size: int = 64, eval_size: int = 32,
                     seed: int = 0, imbalance_factor: float = 100, data_cfg=None) -> DataBundle:
    """Random images over `num_classes` classes (the REAL class count of a recipe, for --dry-run).

    `class_counts` are NOMINAL: the exp long-tail profile of a real dataset with this many
    classes, `longtail_counts(500, num_classes, imbalance_factor)` (IF 100: 500 down to 5, so
    every class is non-empty and the many / medium / few groups are all present), so that the
    losses and optimizers see realistic counts. The `train_size` random training images have
    labels spread along the same profile (largest remainder; every class gets one when
    train_size >= num_classes); their actual counts are in `splits_info["train_label_counts"]`.
    Validation and test hold `eval_size` samples each, labels cycling over the classes.
    """
    if num_classes < 1:
        raise UserError(f"synthetic data needs at least one class, got {num_classes}")
    size = int(preprocess.get("image_size", 224) if isinstance(preprocess, dict) else 224)
    factor = float(imbalance_factor) if imbalance_factor else 1.0
    nominal = longtail_counts(SYNTHETIC_N_MAX, num_classes, max(1.0, factor))
    actual = spread_counts(int(train_size), num_classes, factor)
    train_labels = np.repeat(np.arange(num_classes), actual)
    train_labels = train_labels[np.random.default_rng(seed).permutation(len(train_labels))]
    eval_labels = np.arange(int(eval_size)) % num_classes
    train = SyntheticDataset(train_labels, size, seed=seed * 3 + 0, name="synthetic/train")
    val = SyntheticDataset(eval_labels, size, seed=seed * 3 + 1, name="synthetic/val")
    test = SyntheticDataset(eval_labels, size, seed=seed * 3 + 2, name="synthetic/test")
    classnames = [f"class_{c}" for c in range(num_classes)]
    info = {"dataset": "synthetic", "sources": {"train": "random tensors", "val": "random tensors",
                                                "test": "random tensors"},
            "imbalance_factor": factor,
            "class_counts": f"nominal: longtail_counts({SYNTHETIC_N_MAX}, {num_classes}, {factor:g})",
            "train_label_counts": actual}

    class _Cfg:  # transforms are not used by synthetic data; defaults for the five-crop builder
        test_resize, hflip, train_crop_scale, image_size, skip_bad_images = 224, True, [0.08, 1.0], size, False

    return finish_bundle(train, val, test, classnames, None, preprocess, data_cfg or _Cfg(), info,
                         class_counts=nominal)
