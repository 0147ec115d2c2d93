"""ImageNet-C on disk: scanning the standard layout and a Dataset over many subsets.

Layout (Hendrycks & Dietterich, 2019; also what `ft_focal.data.corrupt.render_corruptions`
writes)::

    root/<corruption>/<severity 1..5>/<class folder, e.g. wnid>/<image>.JPEG

A *subset* is one (corruption, severity) pair. `scan_imagenet_c` validates the whole request
before anything is decoded (every missing folder is listed in one message) and returns one flat
sample list; `ImageNetCDataset` serves all requested subsets from that list so a single
DataLoader (one pool of decoding workers) covers the whole benchmark.

Class folders are mapped to labels by `class_to_label`, which the CALLER supplies in the model's
label order (e.g. the wnids of the ImageNet-LT classnames file, line i = label i); use
`wnid_mapping`, `read_classnames` or `class_to_label_from_split_list`. Folders are never
numbered alphabetically behind the caller's back.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from ft_focal.errors import UserError, one_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "wnid_mapping",
    "read_classnames",
    "class_to_label_from_classnames",
    "class_to_label_from_split_list",
    "scan_imagenet_c",
    "subset_list",
    "ImageNetCDataset",
    "load_rgb",
    "class_folders",
    "class_to_label_for",
    "discover_corruptions",
]

#: File suffixes treated as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

#: One sample: (corruption, severity, path, label).
Sample = tuple[str, int, str, int]


# ----------------------------------------------------------------------------- class order

def wnid_mapping(wnids: Sequence[str]) -> dict[str, int]:
    """Folder name -> label, where label = position in `wnids` (the model's label order).

    Raises UserError on an empty list, a blank name or a duplicate.
    """
    wnids = [str(w).strip() for w in wnids]
    if not wnids:
        raise UserError("class list is empty: need one class folder name (wnid) per label")
    mapping: dict[str, int] = {}
    for i, w in enumerate(wnids):
        if not w:
            raise UserError(f"class list entry {i} is blank")
        if w in mapping:
            raise UserError(f"class '{w}' appears twice in the class list (labels {mapping[w]} and {i})")
        mapping[w] = i
    return mapping


def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_classnames(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a classnames file: one line per label, `<id> <name>` (name may contain spaces).

    This is the format of ImageNet-LT's `classnames.txt` (`n01440764 tench`); line i is label i.
    Blank lines are skipped; `.gz` files are read transparently. Returns [(id, name), ...].
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: classnames file not found")
    out: list[tuple[str, str]] = []
    try:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise UserError(f"{path} line {lineno}: expected '<id> <name>', got {line!r}")
                out.append((parts[0], parts[1]))
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read classnames file ({one_line(exc)})") from None
    if not out:
        raise UserError(f"{path}: classnames file is empty")
    return out


def class_to_label_from_classnames(path: str | os.PathLike) -> dict[str, int]:
    """`wnid_mapping` of the ids in a classnames file (line i -> label i)."""
    path = Path(path)
    ids = [i for i, _ in read_classnames(path)]
    try:
        return wnid_mapping(ids)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def class_to_label_from_split_list(path: str | os.PathLike) -> dict[str, int]:
    """Class folder -> label from a split list with lines `<dir>/<class>/<file> <label>`.

    The ImageNet-LT lists (`val/n01440764/ILSVRC2012_val_00029930.JPEG 0`) carry the wnid as the
    parent folder of every image; this reads that pairing and checks it is consistent (one label
    per folder and one folder per label).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split list not found")
    mapping: dict[str, int] = {}
    by_label: dict[int, str] = {}
    try:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2:
                    raise UserError(f"{path} line {lineno}: expected '<relative path> <label>', got {line!r}")
                rel, lab = parts
                try:
                    label = int(lab)
                except ValueError:
                    raise UserError(f"{path} line {lineno}: label {lab!r} is not an integer") from None
                folder = Path(rel).parent.name
                if not folder:
                    raise UserError(f"{path} line {lineno}: path {rel!r} has no class folder")
                if mapping.setdefault(folder, label) != label:
                    raise UserError(
                        f"{path} line {lineno}: folder '{folder}' has label {label} here but {mapping[folder]} earlier"
                    )
                if by_label.setdefault(label, folder) != folder:
                    raise UserError(
                        f"{path} line {lineno}: label {label} is folder '{folder}' here but '{by_label[label]}' earlier"
                    )
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read split list ({one_line(exc)})") from None
    if not mapping:
        raise UserError(f"{path}: split list is empty")
    return mapping


# ----------------------------------------------------------------------------- scanning

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subset_list(corruptions: Sequence[str], severities: Sequence[int]) -> list[tuple[str, int]]:
    """The (corruption, severity) pairs in evaluation order: corruption-major."""
    return [(c, int(s)) for c in corruptions for s in severities]


def _check_request(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    if isinstance(corruptions, str):
        raise UserError(f"corruptions must be a list of names, got the string {corruptions!r}")
    if not corruptions:
        raise UserError("no corruptions requested")
    if not severities:
        raise UserError("no severities requested")
    dup = sorted({c for c in corruptions if list(corruptions).count(c) > 1})
    if dup:
        raise UserError(f"corruption(s) requested twice: {', '.join(dup)}")
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5:
            raise UserError(f"severity {s!r} is not an integer in 1..5")
    if len(set(severities)) != len(severities):
        raise UserError(f"severities requested twice: {list(severities)}")


def _check_subset_folders(root: Path, corruptions: Sequence[str], severities: Sequence[int]) -> None:
    missing: list[str] = []
    for c in corruptions:
        if not (root / c).is_dir():
            missing.append(f"{c}/")
            continue
        missing.extend(f"{c}/{s}/" for s in severities if not (root / c / str(s)).is_dir())
    if missing:
        raise UserError(
            f"{root}: missing {len(missing)} ImageNet-C folder(s): {', '.join(missing)}"
        )


def _scan_subset(root: Path, c: str, s: int, class_to_label: dict[str, int], unknown: list[str]) -> list[Sample]:
    """The samples of one `<corruption>/<severity>/` folder; class folders not in the class list go to `unknown`."""
    samples: list[Sample] = []
    with os.scandir(root / c / str(s)) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            continue  # stray files next to class folders (e.g. a README) are ignored
        if entry.name not in class_to_label:
            unknown.append(f"{c}/{s}/{entry.name}")
            continue
        label = int(class_to_label[entry.name])
        with os.scandir(entry.path) as files:
            names = sorted(f.name for f in files if _is_image(f.name) and f.is_file())
        samples.extend((c, int(s), os.path.join(entry.path, n), label) for n in names)
    return samples


def scan_imagenet_c(
    root: str | os.PathLike,
    corruptions: Sequence[str],
    severities: Sequence[int],
    class_to_label: dict[str, int],
) -> list[Sample]:
    """List every image of the requested subsets as (corruption, severity, path, label).

    Validation happens before the list is returned, and each check reports everything it found:
    - `root` missing -> UserError;
    - any missing `<corruption>/` or `<corruption>/<severity>/` folder -> ONE UserError listing
      all of them;
    - a class folder that is not a key of `class_to_label` -> UserError naming the folder (and
      how many such folders there are);
    - a subset without any image -> UserError naming the subset(s).
    Order: subsets in `subset_list` order, then class folders and files sorted by name, so the
    result (and therefore sharding across processes) is deterministic.
    """
    root = Path(root)
    _check_request(corruptions, severities)
    if not class_to_label:
        raise UserError("class_to_label is empty: pass the model's class folder names (wnids) in label order")
    if not root.is_dir():
        raise UserError(f"{root}: ImageNet-C root folder not found")

    subsets = subset_list(corruptions, severities)
    _check_subset_folders(root, corruptions, severities)

    samples: list[Sample] = []
    unknown: list[str] = []
    empty: list[str] = []
    for c, s in subsets:
        found = _scan_subset(root, c, s, class_to_label, unknown)
        if not found:
            empty.append(f"{c}/{s}")
        samples.extend(found)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(
            f"{root}: class folder '{unknown[0]}' is not in the model's class list{more}; "
            "check the classnames / wnid order"
        )
    if empty:
        raise UserError(f"{root}: no images in subset(s) {', '.join(empty)}")
    return samples


# ----------------------------------------------------------------------------- dataset

def load_rgb(path: str):
    """Decode an image file into an RGB PIL image (any mode: L, P, RGBA, CMYK, I;16 ...)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: scale to 8 bit instead of clipping
                import numpy as np

                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return Image.fromarray(arr, mode="L").convert("RGB")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # composite transparency on white rather than on undefined colour values
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports corrupt files as OSError
        raise UserError(f"{path}: cannot decode image ({one_line(exc)})") from None


class ImageNetCDataset:
    """All requested ImageNet-C subsets as one map-style dataset.

    Item i -> (transform(image), label, subset_index) where subset_index indexes `self.subsets`
    (the (corruption, severity) pairs, in `subset_list` order). Each image is decoded once per
    access, in the DataLoader worker that asks for it.

    Construct from a `scan_imagenet_c` result, or with `ImageNetCDataset.from_root(...)`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Optional[Callable] = None,
        subsets: Optional[Sequence[tuple[str, int]]] = None,
    ):
        self.samples = list(samples)
        self.transform = transform
        if subsets is None:  # order of first appearance
            seen: dict[tuple[str, int], None] = {}
            for c, s, _, _ in self.samples:
                seen.setdefault((c, int(s)), None)
            subsets = list(seen)
        self.subsets = [(c, int(s)) for c, s in subsets]
        self._subset_index = {cs: i for i, cs in enumerate(self.subsets)}
        for c, s, p, _ in self.samples:
            if (c, int(s)) not in self._subset_index:
                raise ValueError(f"sample {p} belongs to subset {c}/{s}, which is not in `subsets`")

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike,
        corruptions: Sequence[str],
        severities: Sequence[int],
        class_to_label: dict[str, int],
        transform: Optional[Callable] = None,
    ) -> "ImageNetCDataset":
        samples = scan_imagenet_c(root, corruptions, severities, class_to_label)
        return cls(samples, transform, subset_list(corruptions, severities))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        c, s, path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, self._subset_index[(c, s)]


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names under `root/<corruption>/<severity>/` of the first subset found
    (handy to build a mapping for a custom -C set whose folders are the class names)."""
    root = Path(root)
    for c in sorted(p for p in root.iterdir() if p.is_dir()):
        for s in sorted(p for p in c.iterdir() if p.is_dir()):
            return sorted(p.name for p in s.iterdir() if p.is_dir() and not p.name.startswith("."))
    return []


def discover_corruptions(root: str | os.PathLike, known_order: Sequence[str] = ()) -> list[str]:
    """Corruption folders present under `root`: names in `known_order` first (in that order),
    then any other folder, sorted. Hidden folders and files (e.g. render_info.json) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: ImageNet-C root folder not found")
    present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not present:
        raise UserError(f"{root}: no corruption folders found (expected root/<corruption>/<severity>/<class>/<image>)")
    ordered = [c for c in known_order if c in present]
    return ordered + sorted(present - set(ordered))


def class_to_label_for(
    root: str | os.PathLike,
    classnames: Optional[Sequence[str]] = None,
    wnids: Optional[Sequence[str]] = None,
) -> dict[str, int]:
    """Class folder -> label for an ImageNet-C-layout folder, in the model's label order.

    - `wnids` given (ImageNet-style models: wnid i = label i): `wnid_mapping(wnids)`.
    - else the class folders found under the first subset of `root` are matched to `classnames`
      (label i = classnames[i]): exactly, or with spaces written as underscores, or as the label
      number itself ("0", "1", ... as written by `sources_from_arrays`).
    A folder that matches nothing is a UserError naming it.
    """
    if wnids:
        return wnid_mapping(list(wnids))
    folders = class_folders(root)
    if not folders:
        raise UserError(f"{root}: no class folders found under <corruption>/<severity>/")
    if not classnames:
        raise UserError(f"{root}: the model has neither wnids nor class names to map the class folders to labels")
    names = [str(n) for n in classnames]
    candidates = [
        {n: i for i, n in enumerate(names)},
        {n.replace(" ", "_"): i for i, n in enumerate(names)},
        {str(i): i for i in range(len(names))},
    ]
    for mapping in candidates:
        if len(mapping) == len(names) and all(f in mapping for f in folders):
            return mapping
    unknown = next(f for f in folders if f not in candidates[0] and f not in candidates[1] and f not in candidates[2])
    raise UserError(
        f"{root}: class folder '{unknown}' matches no class name of the model (nor a label number 0..{len(names) - 1}); "
        "pass the wnids / class list the folders use"
    )
