"""`ft-focal check-data RECIPE`: verify every image of every split before a long run.

`check_data(data_cfg, workers)` parses the lists / folders / dataset of the recipe's data
section and opens, fully decodes and converts to RGB every image of every split, in parallel
(threads: Pillow releases the GIL while decoding), with a tqdm progress bar. It returns ALL
problems found (one line each, `file: what is wrong`) instead of stopping at the first; an
empty list means the data is usable. Conversions that training performs silently (CMYK,
16-bit, palette, grayscale, RGBA -> RGB) are not problems.
"""

from __future__ import annotations

import os
from multiprocessing.pool import ThreadPool
from typing import Any, Optional

from tqdm.auto import tqdm

from ft_focal.data import sources
from ft_focal.data.images import DataError
from ft_focal.data.splits import parse_classnames, parse_split_list, resolve_path
from ft_focal.errors import UserError


def _check_images(name: str, ds, workers: int, problems: list) -> None:
    n = len(ds)
    if n == 0:
        return

    def one(i: int) -> Optional[str]:
        try:
            ds.load_image(i)
        except (DataError, UserError) as exc:
            return str(exc)
        except Exception as exc:  # anything else is a problem of this image too
            return f"{ds.describe(i)}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        return None

    found = []
    with ThreadPool(max(1, workers)) as pool, tqdm(total=n, desc=f"check {name}", unit="img",
                                                      dynamic_ncols=True, leave=False) as bar:
        for i, msg in pool.imap_unordered(lambda i: (i, one(i)), range(n), chunksize=32):
            if msg is not None:
                found.append((i, msg))
            bar.update(1)
    problems.extend(msg for _, msg in sorted(found))


def _split_file_num_classes(data_cfg: Any, problems: list[str]) -> Optional[int]:
    """The class count the split lists are checked against: data.classnames' when given, else the declared one."""
    declared = getattr(data_cfg, "num_classes", None)
    if not data_cfg.classnames:
        return declared
    try:
        names = parse_classnames(resolve_path(data_cfg.classnames, "data.classnames", data_cfg.root))
    except UserError as exc:
        problems.append(str(exc))
        return declared
    num_classes = len(names.names)
    if declared is not None and declared != num_classes:
        problems.append(f"{names.source}: {num_classes} classes, but data.num_classes is {declared}")
    return num_classes


def _check_split_list(data_cfg: Any, root: Any, split: str, num_classes: Optional[int], workers: int,
                      problems: list[str]) -> None:
    value = getattr(data_cfg, f"{split}_list")
    if value is None:
        if split != "val":
            problems.append(f"data.{split}_list: not set (required for data.dataset=split_file)")
        return
    try:
        path = resolve_path(value, f"data.{split}_list", data_cfg.root)
        lst = parse_split_list(path, num_classes, errors=problems)
    except UserError as exc:
        problems.append(str(exc))
        return
    if len(lst) == 0:
        problems.append(f"{path}: the split list has no valid entries")
        return
    ds = sources.FileListDataset(str(root), lst.paths, lst.labels, origin=lst.source, lines=lst.lines, name=split)
    _check_images(split, ds, workers, problems)


def _check_split_file(data_cfg: Any, workers: int) -> list[str]:
    # Parse everything ourselves so that every bad line is reported, not only the first.
    try:
        root = sources.require_root(data_cfg, "split_file")
    except UserError as exc:
        return [str(exc)]
    problems: list[str] = []
    num_classes = _split_file_num_classes(data_cfg, problems)
    for split in ("train", "val", "test"):
        _check_split_list(data_cfg, root, split, num_classes, workers, problems)
    return problems


def _check_built_source(data_cfg: Any, kind: str, workers: int) -> list[str]:
    builders = {k: v for k, v in sources.SOURCES.items() if k != "split_file"}  # split_file: checked line by line
    if kind not in builders:
        return [f"data.dataset: {kind!r} is not a known source"]
    try:
        raw = builders[kind](data_cfg, 0)
    except UserError as exc:
        return [str(exc)]
    problems: list[str] = []
    declared = getattr(data_cfg, "num_classes", None)
    if declared is not None and declared != len(raw.classnames):
        problems.append(f"data.num_classes is {declared} but the data has {len(raw.classnames)} classes")
    if kind in ("image_folder", "hf"):
        for split in ("train", "val", "test"):
            ds = getattr(raw, split)
            if ds is not None:
                _check_images(split, ds, workers, problems)
    return problems


def check_data(data_cfg: Any, workers: int = 0) -> list[str]:
    """Every problem of the recipe's data (lists, labels, images), one line each; [] if none."""
    workers = workers if workers and workers > 0 else (os.cpu_count() or 1)
    kind = data_cfg.dataset
    if kind == "split_file":
        return _check_split_file(data_cfg, workers)
    if kind == "synthetic":
        return []
    return _check_built_source(data_cfg, kind, workers)
