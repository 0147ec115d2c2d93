"""Natural distribution-shift test sets, each read from the layout its users download.

Suite kinds (schema: eval/README.md; metrics: docs/metrics.md "Distribution shifts"):

- `imagenet_v2`: root/<variant folder>/<0..999>/<image>; the numeric folder is the index in
  ImageNet-1k's sorted synset order. Three variants (matched frequency, threshold 0.7, top images).
- `imagenet_r`, `imagenet_a`: root/<wnid>/<image>, 200 wnids each (the lists of timm, copied in
  ft_focal/resources/imagenet_shifts/). The logits are RESTRICTED to the 200 classes: the
  prediction is the argmax over those columns only.
- `imagenet_sketch`: root/<wnid>/<image>, the 1000 ImageNet classes.
- `objectnet`: root/images/<folder>/<image> + root/mappings/ (the download's own files, which
  cannot be redistributed). Each of its 113 ImageNet-overlapping classes maps to one or several
  ImageNet classes; its score is the MAX over the mapped logits. The images' border is cropped
  (`border_crop` pixels per side, 2 as in mlfoundations/wise-ft src/datasets/objectnet.py: the
  images carry a 1-pixel red frame).
- `shift`: any test set labelled in the model's own classes: a split list (`relative/path label`)
  or class folders named like the model's classes (name, name with `_` for spaces, or label number).

The ImageNet kinds need a model whose classes are ImageNet's 1000 (its wnids.json, any order);
anything else is refused in one line. Everything a suite reads is checked first: missing folders
and files are listed in ONE message. A `ShiftSet` is the result: image paths, labels in the
scoring classes, the training count of each scoring class (shot groups) and how logits map to
the scoring classes (`project_logits`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ft_focal.data.imagenet_c import IMAGE_EXTENSIONS, load_rgb
from ft_focal.errors import UserError

logger = logging.getLogger(__name__)

SHIFT_KINDS = ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet", "shift")
IMAGENET_SHIFT_KINDS = SHIFT_KINDS[:-1]
#: ImageNet-V2 variants -> the folder each archive of the ImageNet-V2 release extracts to.
V2_VARIANTS = {
    "matched_frequency": "imagenetv2-matched-frequency-format-val",
    "threshold_0.7": "imagenetv2-threshold0.7-format-val",
    "top_images": "imagenetv2-top-images-format-val",
}
OBJECTNET_MAPPINGS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                      "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def shift_schemas(common: dict, key: Callable, required: Any) -> dict[str, dict]:
    """The suite schemas of the shift kinds, built from suites.py's common keys and `_Key`."""
    fit = {"intercept": key((float, int, type(None)), None), "slope": key((float, int, type(None)), None),
           "source": key((str, type(None)), None)}
    base = {**common, "shots": {"many": key((int,), 100), "few": key((int,), 20)}, "effective_robustness": fit}
    root = key((str,), required, path=True)
    return {
        "imagenet_v2": {**base, "root": root, "variants": key((dict,), dict(V2_VARIANTS))},
        "imagenet_r": {**base, "root": root},
        "imagenet_a": {**base, "root": root},
        "imagenet_sketch": {**base, "root": root},
        "objectnet": {**base, "root": root, "border_crop": key((int,), 2)},
        "shift": {**base, "root": root, "split_list": key((str, type(None)), None, path=True),
                  "transform": key((str,), "model", ("model", "suite"))},
    }


def check_shift_suite(suite: dict, where: str) -> None:
    """Checks beyond types: thresholds, the fit's keys together, the variants mapping."""
    if suite["shots"]["few"] > suite["shots"]["many"]:
        raise UserError(f"{where}: key 'shots.few' ({suite['shots']['few']}) exceeds 'shots.many' ({suite['shots']['many']})")
    fit = suite["effective_robustness"]
    given = [k for k in ("intercept", "slope", "source") if fit[k] is not None]
    if given and len(given) != 3:
        raise UserError(f"{where}: key 'effective_robustness' needs intercept, slope AND source (the fit's "
                        f"origin), got only {', '.join(given)}")
    if suite["kind"] == "imagenet_v2":
        variants = suite["variants"]
        if not variants or not all(isinstance(k, str) and isinstance(v, str) for k, v in variants.items()):
            raise UserError(f"{where}: key 'variants' must map variant names to folder names under 'root'")
    if suite["kind"] == "objectnet" and suite["border_crop"] < 0:
        raise UserError(f"{where}: key 'border_crop' must be >= 0, got {suite['border_crop']}")
    if suite["kind"] != "shift" and suite["preprocessing"]["five_crop"]:
        raise UserError(f"{where}: key 'preprocessing.five_crop' is not supported for shift suites")


# ----------------------------------------------------------------------------- class lists


@lru_cache(maxsize=None)
def imagenet_synsets() -> tuple[str, ...]:
    """ImageNet-1k wnids in sorted order (index = the class index of torchvision / timm / V2)."""
    text = (_RESOURCES / "imagenet_lt" / "classnames.txt").read_text()
    return tuple(line.split()[0] for line in text.splitlines() if line.strip())


@lru_cache(maxsize=None)
def subset_classes(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(wnids, ImageNet-1k indices) of the 200 classes of `name` in {"imagenet_r", "imagenet_a"}."""
    folder = _RESOURCES / "imagenet_shifts"
    wnids = tuple((folder / f"{name}_synsets.txt").read_text().split())
    indices = tuple(int(i) for i in (folder / f"{name}_indices.txt").read_text().split())
    return wnids, indices


def imagenet_labels_of(wnids: Optional[Sequence[str]], num_classes: int, where: str) -> np.ndarray:
    """The model's label of every ImageNet-1k index [1000]; refuses a model that is not over the 1000."""
    synsets = imagenet_synsets()
    if not wnids or len(wnids) != len(synsets) or set(wnids) != set(synsets):
        have = f"{num_classes} classes" + ("" if wnids else " and no wnids.json")
        raise UserError(f"{where}: this suite needs a model over ImageNet's 1000 classes (wnids.json listing the "
                        f"1000 synsets); the model has {have}")
    position = {w: i for i, w in enumerate(wnids)}
    return np.array([position[w] for w in synsets], dtype=np.int64)


# ----------------------------------------------------------------------------- the sets


@dataclass
class ShiftSet:
    """One shifted test set, ready to score.

    labels [N] are in the SCORING classes: the model's own classes, except for ObjectNet (its
    classes). counts [K]: training images per scoring class (shot groups). `allowed`: model labels
    the argmax may choose (ImageNet-R / -A), None = all; `columns`: per ObjectNet class the model
    labels whose max is its score, None = the model's logits as they are.
    """

    name: str
    paths: list[str]
    labels: np.ndarray
    counts: list[int]
    allowed: Optional[list[int]] = None
    columns: Optional[list[list[int]]] = None
    border_crop: int = 0
    subsets: Optional[np.ndarray] = None  # ImageNet-C: the (corruption, severity) index of each image
    subset_names: list = field(default_factory=list)

    def project(self, logits: torch.Tensor) -> torch.Tensor:
        return project_logits(logits, self.allowed, self.columns)


def project_logits(logits: torch.Tensor, allowed: Optional[Sequence[int]] = None,
                   columns: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """Scores of the scoring classes from the model's logits [B, C].

    allowed: every other column is set to -inf, so the argmax runs over `allowed` only ([B, C]);
    columns: score_k = max_{c in columns[k]} logits[:, c] ([B, K]). Neither: logits unchanged.
    """
    if columns is not None:
        return torch.stack([logits[:, list(cols)].max(dim=1).values for cols in columns], dim=1)
    if allowed is not None:
        keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        keep[list(allowed)] = True
        return logits.masked_fill(~keep, float("-inf"))
    return logits


class ShiftImages(torch.utils.data.Dataset):
    """(transform(image), label) for every path of a ShiftSet; `border_crop` px cut from each side first."""

    def __init__(self, shift: ShiftSet, transform: Callable):
        self.paths, self.labels, self.transform, self.border = shift.paths, shift.labels, transform, shift.border_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = load_rgb(self.paths[i])
        if self.border:
            w, h = image.size
            image = image.crop((self.border, self.border, w - self.border, h - self.border))
        return self.transform(image), int(self.labels[i])


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _class_dirs(root: Path) -> list[str]:
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _require(paths: Sequence[Path], where: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"{where}: missing {len(missing)} folder(s) / file(s): {', '.join(missing)}")


def _collect(root: Path, folder_label: dict[str, int], where: str, what: str) -> tuple[list[str], list[int]]:
    """Images of every class folder of `root` with its label; a folder not in `folder_label` is an error."""
    paths: list[str] = []
    labels: list[int] = []
    folders = _class_dirs(root)
    unknown = [f for f in folders if f not in folder_label]
    if unknown:
        raise UserError(f"{where}: {root}: class folder '{unknown[0]}' is not {what}"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for folder in folders:
        files = _images_in(root / folder)
        paths += files
        labels += [folder_label[folder]] * len(files)
    if not paths:
        raise UserError(f"{where}: {root}: no images found in its class folders")
    return paths, labels


def _warn_absent(root: Path, expected: Sequence[str], where: str) -> None:
    present = set(_class_dirs(root))
    absent = [f for f in expected if f not in present]
    if absent:
        logger.warning("%s: %d of the %d class folders are absent from %s (e.g. %s); accuracy is over the "
                       "classes present", where, len(absent), len(expected), root, ", ".join(absent[:3]))


def build_shift_sets(suite: dict, wnids: Optional[Sequence[str]], classnames: Sequence[str],
                     class_counts: Sequence[int]) -> list[ShiftSet]:
    """The ShiftSets of a shift suite for a model with these wnids / class names / training counts."""
    where, kind, root = suite.get("path", suite["name"]), suite["kind"], Path(suite["root"])
    counts = [int(c) for c in class_counts]
    if kind == "shift":
        return [_generic_set(suite, root, classnames, counts, where)]
    imagenet_label = imagenet_labels_of(wnids, len(classnames), where)
    if kind == "imagenet_v2":
        folders = {name: root / sub for name, sub in suite["variants"].items()}
        _require([root] + list(folders.values()), where)
        numeric = {str(i): int(imagenet_label[i]) for i in range(1000)}
        sets = []
        for name, folder in folders.items():
            paths, labels = _collect(folder, numeric, where, "a class number 0..999")
            sets.append(ShiftSet(f"{suite['name']}/{name}", paths, np.array(labels), counts))
        return sets
    _require([root], where)
    if kind in ("imagenet_r", "imagenet_a"):
        subset, _ = subset_classes(kind)
        model_of = {w: int(imagenet_label[imagenet_synsets().index(w)]) for w in subset}
        _warn_absent(root, subset, where)
        paths, labels = _collect(root, model_of, where, f"one of the 200 {kind} classes")
        return [ShiftSet(suite["name"], paths, np.array(labels), counts, allowed=sorted(model_of.values()))]
    if kind == "imagenet_sketch":
        model_of = {w: int(imagenet_label[i]) for i, w in enumerate(imagenet_synsets())}
        _warn_absent(root, imagenet_synsets(), where)
        paths, labels = _collect(root, model_of, where, "an ImageNet-1k wnid")
        return [ShiftSet(suite["name"], paths, np.array(labels), counts)]
    return [_objectnet_set(suite, root, imagenet_label, counts, where)]


def objectnet_classes(mappings: Path, where: str) -> tuple[list[str], list[list[int]]]:
    """(image folders, ImageNet-1k indices of each) of the ObjectNet classes that overlap ImageNet,
    folders sorted by name, from the download's mappings/ (the construction of wise-ft's objectnet.py)."""
    def load(name: str) -> Any:
        try:
            return json.loads((mappings / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{where}: {mappings / name}: corrupt JSON ({exc})") from None

    folder_of = {label: folder for folder, label in load("folder_to_objectnet_label.json").items()}
    to_imagenet = load("objectnet_to_imagenet_1k.json")
    torch_index_of_2012 = {int(v): int(k) for k, v in load("pytorch_to_imagenet_2012_id.json").items()}
    names_2012 = (mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    index_of_name = {name.strip(): torch_index_of_2012[i] for i, name in enumerate(names_2012) if name.strip()}
    by_folder: dict[str, list[int]] = {}
    for objectnet_name, imagenet_names in to_imagenet.items():
        if objectnet_name not in folder_of:
            raise UserError(f"{where}: {mappings}: ObjectNet class {objectnet_name!r} has no folder in "
                            "folder_to_objectnet_label.json")
        unknown = [n for n in imagenet_names.split("; ") if n not in index_of_name]
        if unknown:
            raise UserError(f"{where}: {mappings}: ImageNet class {unknown[0]!r} (for {objectnet_name!r}) is not "
                            "in imagenet_to_label_2012_v2")
        by_folder[folder_of[objectnet_name]] = sorted(index_of_name[n] for n in imagenet_names.split("; "))
    folders = sorted(by_folder)
    return folders, [by_folder[f] for f in folders]


def _objectnet_set(suite: dict, root: Path, imagenet_label: np.ndarray, counts: list[int], where: str) -> ShiftSet:
    images, mappings = root / "images", root / "mappings"
    _require([images, mappings] + [mappings / m for m in OBJECTNET_MAPPINGS], where)
    folders, indices = objectnet_classes(mappings, where)
    columns = [[int(imagenet_label[i]) for i in idx] for idx in indices]
    label_of = {f: k for k, f in enumerate(folders)}
    paths: list[str] = []
    labels: list[int] = []
    for folder in _class_dirs(images):  # the ObjectNet classes outside ImageNet are not scored
        if folder in label_of:
            files = _images_in(images / folder)
            paths += files
            labels += [label_of[folder]] * len(files)
    if not paths:
        raise UserError(f"{where}: {images}: no images of the ImageNet-overlapping ObjectNet classes")
    # A merged class has the training images of all its ImageNet classes (docs/metrics.md).
    merged_counts = [sum(counts[c] for c in cols) for cols in columns]
    return ShiftSet(suite["name"], paths, np.array(labels), merged_counts, columns=columns,
                    border_crop=suite["border_crop"])


def _generic_set(suite: dict, root: Path, classnames: Sequence[str], counts: list[int], where: str) -> ShiftSet:
    from ft_focal.data.splits import parse_split_list

    if suite["split_list"] is not None:
        _require([root, Path(suite["split_list"])], where)
        split = parse_split_list(Path(suite["split_list"]), num_classes=len(classnames))
        paths = [str(root / split.path(i)) for i in range(len(split))]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{where}: {len(missing)} image(s) of {suite['split_list']} not found (e.g. {missing[0]})")
        return ShiftSet(suite["name"], paths, split.labels.copy(), counts)
    _require([root], where)
    names = [str(n) for n in classnames]
    label_of = {**{str(i): i for i in range(len(names))}, **{n.replace(" ", "_"): i for i, n in enumerate(names)},
                **{n: i for i, n in enumerate(names)}}
    paths, labels = _collect(root, label_of, where, "a class name (or label number) of the model")
    return ShiftSet(suite["name"], paths, np.array(labels), counts)


__all__ = ["SHIFT_KINDS", "IMAGENET_SHIFT_KINDS", "V2_VARIANTS", "ShiftSet", "ShiftImages", "build_shift_sets",
           "check_shift_suite", "imagenet_labels_of", "imagenet_synsets", "objectnet_classes", "project_logits",
           "shift_schemas", "subset_classes"]
