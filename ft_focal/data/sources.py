"""One builder per `data.dataset` source; each returns the untransformed splits (`RawData`).

`finish` then applies, in this order: long-tailed subsampling of the training split
(`data.imbalance_factor`, for sources that are not long-tailed already), the alphabetical
label remap (`data.label_order: alphabetical`), the transforms and the class counts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ft_focal.data.datasets import ArrayDataset, DataBundle, FileListDataset, HFImageDataset, LabelledImages, finish_bundle
from ft_focal.data.longtail import longtail_counts, stratified_holdout, subsample_longtail
from ft_focal.data.splits import WNID_RE, ClassNames, alphabetical_permutation, parse_classnames, parse_split_list, resolve_path
from ft_focal.errors import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class RawData:
    train: LabelledImages
    val: Optional[LabelledImages]
    test: LabelledImages
    classnames: list
    wnids: Optional[list] = None
    info: dict = field(default_factory=dict)
    longtail_done: bool = False  # the source already applied data.imbalance_factor


def _declared(cfg) -> Optional[int]:
    """data.num_classes, when the recipe states it (checked against the data)."""
    n = getattr(cfg, "num_classes", None)
    if n is not None and n < 1:
        raise UserError(f"data.num_classes must be >= 1, got {n}")
    return n


def _skip(cfg) -> bool:
    return bool(getattr(cfg, "skip_bad_images", False))


def _load_classnames(cfg) -> Optional[ClassNames]:
    if not cfg.classnames:
        return None
    return parse_classnames(resolve_path(cfg.classnames, "data.classnames", cfg.root))


def require_root(cfg, kind: str) -> Path:
    if not cfg.root:
        raise UserError(f"data.dataset={kind} needs 'data.root'")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root: directory not found: {cfg.root}")
    return root


# ----------------------------------------------------------------------------- split lists


def split_list_paths(cfg) -> dict:
    """{split: resolved list path or None}; train and test are required."""
    out = {}
    for split in ("train", "val", "test"):
        value = getattr(cfg, f"{split}_list")
        if value is None:
            if split != "val":
                raise UserError(f"data.dataset=split_file needs 'data.{split}_list'")
            out[split] = None
        else:
            out[split] = resolve_path(value, f"data.{split}_list", cfg.root)
    return out


def from_split_files(cfg, seed: int) -> RawData:
    root = require_root(cfg, "split_file")
    names = _load_classnames(cfg)
    num_classes = len(names.names) if names is not None else _declared(cfg)
    lists = {s: (parse_split_list(p, num_classes) if p is not None else None)
             for s, p in split_list_paths(cfg).items()}
    if names is None:
        if num_classes is None:
            num_classes = 1 + max(int(lst.labels.max()) for lst in lists.values() if lst is not None and len(lst))
        classnames = [f"class_{c}" for c in range(num_classes)]
        log.warning("data.classnames not set: %d classes named class_0.. (a text-initialised head needs "
                    "real class names)", num_classes)
        wnids = None
    else:
        classnames, wnids = names.names, names.ids
    ds = {s: (FileListDataset(str(root), lst.paths, lst.labels, origin=lst.source, lines=lst.lines,
                              skip_bad=_skip(cfg), name=s) if lst is not None else None)
          for s, lst in lists.items()}
    info = {"dataset": "split_file", "root": str(root),
            "sources": {s: (lst.source if lst is not None else None) for s, lst in lists.items()},
            "classnames_file": names.source if names is not None else None}
    return RawData(ds["train"], ds["val"], ds["test"], classnames, wnids, info)


# ---------------------------------------------------------------------------- image folder


def _scan_class_dir(d: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMG_EXTENSIONS):
                files.append(os.path.join(dirpath, f))
    return files


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _folder_classes(cfg, root: Path, folders: list[str]) -> tuple[dict[str, int], list[str], Optional[list[str]]]:
    """-> (class folder -> label, class names, wnids or None) from the train folders and data.classnames."""
    names = _load_classnames(cfg)
    if names is not None and names.ids is not None:
        index = {w: i for i, w in enumerate(names.ids)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise UserError(f"{root / 'train' / unknown[0]}: class folder not in {names.source} ({len(unknown)} such folders)")
        return index, names.names, names.ids
    index = {f: i for i, f in enumerate(folders)}
    if names is not None:
        if len(names.names) != len(folders):
            raise UserError(f"{names.source}: {len(names.names)} class names for {len(folders)} class folders in "
                            f"{root / 'train'}")
        return index, names.names, None
    wnids = list(folders) if all(WNID_RE.match(f) for f in folders) else None
    return index, list(folders), wnids


def _folder_split_dirs(root: Path) -> dict[str, Optional[Path]]:
    split_dirs: dict[str, Optional[Path]] = {"train": root / "train", "val": root / "val", "test": root / "test"}
    if not split_dirs["test"].is_dir():
        if split_dirs["val"].is_dir():
            log.warning("%s has no 'test' directory: using 'val' as the test split (no validation split)", root)
            split_dirs["test"], split_dirs["val"] = split_dirs["val"], None
        else:
            raise UserError(f"data.root: {root} has neither a 'test' nor a 'val' directory")
    elif not split_dirs["val"].is_dir():
        split_dirs["val"] = None
    return split_dirs


def _folder_split(cfg, d: Path, index: dict[str, int], split: str) -> FileListDataset:
    paths, labels = [], []
    for folder in _class_dirs(d):
        if folder not in index:
            raise UserError(f"{d / folder}: class folder not among the training classes")
        files = _scan_class_dir(d / folder)
        paths += [p.encode("utf-8") for p in files]
        labels += [index[folder]] * len(files)
    if not paths:
        raise UserError(f"{d}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
    return FileListDataset("", np.array(paths, dtype=np.bytes_), labels, skip_bad=_skip(cfg), name=split)


def from_image_folder(cfg, seed: int) -> RawData:
    """root/<split>/<class>/... ; classes = sorted class folders of train (or a classnames file)."""
    root = require_root(cfg, "image_folder")
    if not (root / "train").is_dir():
        raise UserError(f"data.root: {root} has no 'train' directory (expected root/train/<class>/<image>)")
    folders = _class_dirs(root / "train")
    if not folders:
        raise UserError(f"{root / 'train'}: no class folders")
    index, classnames, wnids = _folder_classes(cfg, root, folders)
    ds, sources = {}, {}
    for split, d in _folder_split_dirs(root).items():
        ds[split] = _folder_split(cfg, d, index, split) if d is not None else None
        sources[split] = str(d) if d is not None else None
    info = {"dataset": "image_folder", "root": str(root), "sources": sources}
    return RawData(ds["train"], ds["val"], ds["test"], classnames, wnids, info)


# ------------------------------------------------------------------------ Hugging Face


def load_hf(path: str):
    """A local `DatasetDict`: `load_from_disk` of a saved dataset, else `load_dataset(path)`."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise UserError("data.dataset=hf needs the 'datasets' package") from None
    p = Path(path).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            obj = datasets.load_from_disk(str(p))
        else:
            obj = datasets.load_dataset(str(p) if p.exists() else path)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"data.hf_path: cannot load {path} ({type(exc).__name__}: {text})") from None
    if isinstance(obj, datasets.Dataset):
        raise UserError(f"data.hf_path: {path} holds a single Dataset without splits; save a DatasetDict "
                        f"(e.g. DatasetDict(train=..., test=...).save_to_disk(...))")
    return obj


def _check_hf_splits(cfg, dd, wanted: dict[str, Optional[str]]) -> None:
    available = list(dd.keys())
    for split, key in wanted.items():
        if key is not None and key not in dd:
            raise UserError(f"data.hf_{split}_split: split '{key}' not in {cfg.hf_path} (available: {', '.join(available)})")


def _check_hf_columns(cfg, dd, wanted: dict[str, Optional[str]]) -> None:
    for k in ("image_key", "label_key"):
        col = getattr(cfg, k)
        for key in wanted.values():
            if key is not None and col not in dd[key].column_names:
                raise UserError(f"data.{k}: column '{col}' not in split '{key}' of {cfg.hf_path} "
                                f"(columns: {', '.join(dd[key].column_names)})")


def _hf_classnames(cfg, feature) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """-> (class names, wnids): data.classnames, else the ClassLabel's names, else data.num_classes; None if unknown."""
    names = _load_classnames(cfg)
    if names is not None:
        return names.names, names.ids
    if hasattr(feature, "names") and feature.names:
        return list(feature.names), None
    if _declared(cfg) is not None:
        return [f"class_{c}" for c in range(_declared(cfg))], None
    return None, None


def _hf_labels(cfg, dd, wanted: dict[str, Optional[str]]) -> dict[str, np.ndarray]:
    labels = {}
    for split, key in wanted.items():
        if key is None:
            continue
        lab = np.asarray(dd[key][cfg.label_key])
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise UserError(f"data.label_key: column '{cfg.label_key}' of split '{key}' is not an integer class label")
        labels[split] = lab.astype(np.int64)
    return labels


def _check_hf_label_range(cfg, wanted: dict[str, Optional[str]], labels: dict[str, np.ndarray],
                          classnames: list[str]) -> None:
    for split, lab in labels.items():
        bad = np.flatnonzero((lab < 0) | (lab >= len(classnames)))
        if bad.size:
            i = int(bad[0])
            raise UserError(f"{cfg.hf_path}: split '{wanted[split]}' row {i}: label {int(lab[i])} out of range for "
                            f"{len(classnames)} classes ({bad.size} such rows)")


def from_hf(cfg, seed: int) -> RawData:
    if not cfg.hf_path:
        raise UserError("data.dataset=hf needs 'data.hf_path' (a dataset saved with save_to_disk, or a local dataset directory)")
    dd = load_hf(cfg.hf_path)
    wanted = {"train": cfg.hf_train_split, "val": cfg.hf_val_split, "test": cfg.hf_test_split}
    _check_hf_splits(cfg, dd, wanted)
    first = dd[cfg.hf_train_split]
    _check_hf_columns(cfg, dd, wanted)
    classnames, wnids = _hf_classnames(cfg, first.features.get(cfg.label_key))
    labels = _hf_labels(cfg, dd, wanted)
    if classnames is None:
        n = 1 + max(int(lab.max(initial=-1)) for lab in labels.values())
        classnames = [f"class_{c}" for c in range(n)]
        log.warning("%s: the label column has no class names (not a ClassLabel) and data.classnames is not "
                    "set: %d classes named class_0..", cfg.hf_path, n)
    _check_hf_label_range(cfg, wanted, labels, classnames)
    ds = {split: (HFImageDataset(dd[key], cfg.image_key, labels[split], skip_bad=_skip(cfg),
                                 name=f"{cfg.hf_path}[{key}]") if key is not None else None)
          for split, key in wanted.items()}
    info = {"dataset": "hf", "root": str(cfg.hf_path),
            "sources": {s: (f"{cfg.hf_path}[{k}]" if k else None) for s, k in wanted.items()}}
    return RawData(ds["train"], ds["val"], ds["test"], classnames, wnids, info)


# ---------------------------------------------------------------------------- CIFAR-LT

CIFAR_DEFAULT_IMBALANCE = 100.0


def from_cifar(cfg, seed: int) -> RawData:
    """CIFAR-10/100-LT: exp (or step) profile with n_max = 5000 / 500; test set balanced.

    imbalance_factor null -> 100 (the standard benchmark); 1 keeps the balanced set. No
    validation split (the CIFAR-LT papers select on the test set; the report says so).
    """
    from ft_focal.data.cifar import load_cifar

    xtr, ytr, xte, yte, names, kind, d = load_cifar(cfg.root)
    factor = CIFAR_DEFAULT_IMBALANCE if cfg.imbalance_factor is None else cfg.imbalance_factor
    n_max = int(np.bincount(ytr, minlength=len(names)).max())
    counts = longtail_counts(n_max, len(names), factor, cfg.imbalance_profile)
    keep = subsample_longtail(ytr, counts, seed)
    skip = _skip(cfg)
    train = ArrayDataset(xtr[keep], ytr[keep], skip_bad=skip, name=f"{kind}-lt/train")
    test = ArrayDataset(xte, yte, skip_bad=skip, name=f"{kind}/test")
    info = {"dataset": "cifar_lt", "root": str(d), "imbalance_factor": factor,
            "imbalance_profile": cfg.imbalance_profile,
            "sources": {"train": f"{d} ({kind} train, long-tailed)", "val": None, "test": f"{d} ({kind} test)"}}
    return RawData(train, None, test, names, None, info, longtail_done=True)


# ------------------------------------------------------------------------------- digits


def from_digits(cfg, seed: int) -> RawData:
    from ft_focal.data.digits import DEFAULT_IMBALANCE, load_digits_lt

    splits, names, counts = load_digits_lt(cfg.imbalance_factor, seed, cfg.imbalance_profile)
    ds = {s: ArrayDataset(x, y, name=f"digits/{s}") for s, (x, y) in splits.items()}
    factor = DEFAULT_IMBALANCE if cfg.imbalance_factor is None else cfg.imbalance_factor
    info = {"dataset": "digits_lt", "imbalance_factor": factor, "imbalance_profile": cfg.imbalance_profile,
            "sources": {s: "sklearn.datasets.load_digits" for s in ds}}
    return RawData(ds["train"], ds["val"], ds["test"], names, None, info, longtail_done=True)


# ------------------------------------------------------------------------------- finish


def apply_alphabetical(raw: RawData) -> int:
    """Remap every split's labels to the alphabetical order of the class names; returns #moved."""
    new_of_old = alphabetical_permutation(raw.classnames)
    order = np.argsort(new_of_old)  # old label of each new label
    for ds in (raw.train, raw.val, raw.test):
        if ds is not None:
            ds.remap_labels(new_of_old)
    raw.classnames = [raw.classnames[o] for o in order]
    if raw.wnids is not None:
        raw.wnids = [raw.wnids[o] for o in order]
    return int(np.sum(new_of_old != np.arange(len(new_of_old))))


def finish(raw: RawData, cfg, preprocess: dict, seed: int) -> DataBundle:
    info = dict(raw.info)
    declared = _declared(cfg)
    if declared is not None and declared != len(raw.classnames):
        where = info.get("classnames_file") or info.get("root") or info.get("dataset")
        raise UserError(f"data.num_classes is {declared} but the data has {len(raw.classnames)} classes ({where})")
    if cfg.imbalance_factor is not None and not raw.longtail_done:
        labels = raw.train.labels
        n_max = int(np.bincount(labels, minlength=len(raw.classnames)).max())
        counts = longtail_counts(n_max, len(raw.classnames), cfg.imbalance_factor, cfg.imbalance_profile)
        raw.train = raw.train.subset(subsample_longtail(labels, counts, seed))
        info.update(imbalance_factor=cfg.imbalance_factor, imbalance_profile=cfg.imbalance_profile)
        log.info("long-tailed subsampling of the training split: %d images (IF %s, %s)",
                 len(raw.train), cfg.imbalance_factor, cfg.imbalance_profile)
    if getattr(cfg, "val_fraction", None) is not None:
        hold_out_validation(raw, cfg, info)
    info["label_order"] = cfg.label_order
    if cfg.label_order == "alphabetical":
        if all(n.startswith("class_") for n in raw.classnames):
            raise UserError("data.label_order: alphabetical needs real class names (set data.classnames)")
        moved = apply_alphabetical(raw)
        info["labels_remapped"] = moved
        log.info("labels remapped to alphabetical class-name order (%d of %d classes moved)",
                 moved, len(raw.classnames))
    elif cfg.label_order != "given":
        raise UserError(f"data.label_order: {cfg.label_order!r} is not one of given, alphabetical")
    return finish_bundle(raw.train, raw.val, raw.test, raw.classnames, raw.wnids, preprocess, cfg, info)


def hold_out_validation(raw: RawData, cfg, info: dict) -> None:
    """data.val_fraction: a class-stratified validation split taken from the training split, drawn
    with `data.split_seed` (0 when null: never the run seed, so every run sees the same split)."""
    if raw.val is not None:
        raise UserError(f"data.val_fraction ({cfg.val_fraction}) is set but the data already has a validation "
                        "split; remove data.val_fraction")
    seed = 0 if cfg.split_seed is None else int(cfg.split_seed)
    kept, held_out = stratified_holdout(raw.train.labels, cfg.val_fraction, seed)
    raw.train, raw.val = raw.train.subset(kept), raw.train.subset(held_out)
    info["val_fraction"] = cfg.val_fraction
    info["sources"] = dict(info.get("sources") or {}, val=f"{len(held_out)} images held out of the training split "
                           f"(data.val_fraction {cfg.val_fraction}, class-stratified, seed {seed})")
    log.info("validation split: %d images held out of the training split (data.val_fraction %s, seed %d)",
             len(held_out), cfg.val_fraction, seed)


# data.dataset -> the reader of its raw splits (synthetic data has none: ft_focal/data/build.py)
SOURCES = {
    "split_file": from_split_files,
    "image_folder": from_image_folder,
    "hf": from_hf,
    "cifar_lt": from_cifar,
    "digits_lt": from_digits,
}
