"""Where `ft-focal corrupt` reads its images: (relative output path, image) pairs for
`ft_focal.data.corrupt.render_corruptions`, from an image folder, a split list or arrays
(a recipe's split: ft_focal/commands/corrupt.py).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np

from ft_focal.data.imagenet_c import IMAGE_EXTENSIONS, open_text
from ft_focal.errors import UserError


def sources_from_folder(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(relative path without extension, file path) for every image under `root`
    (e.g. an ImageNet val folder `root/<wnid>/<image>.JPEG`), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                full = os.path.join(dirpath, f)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                out.append((str(PurePosixPath(rel).with_suffix("")), full))
    if not out:
        raise UserError(f"{root}: no images found")
    return out


def sources_from_split_list(root: str | os.PathLike, split_list: str | os.PathLike,
                            strip_prefix: int = 1) -> list[tuple[str, str]]:
    """Sources from a split list (`val/n01440764/x.JPEG 0` lines): output path keeps the last
    path components after dropping `strip_prefix` leading ones (-> `n01440764/x`)."""

    root, split_list = Path(root), Path(split_list)
    if not split_list.is_file():
        raise UserError(f"{split_list}: split list not found")
    out = []
    with open_text(split_list) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            rel = line.rsplit(maxsplit=1)[0] if len(line.split()) > 1 else line
            parts = PurePosixPath(rel).parts
            if len(parts) <= strip_prefix:
                raise UserError(f"{split_list} line {lineno}: path {rel!r} has fewer than {strip_prefix + 1} parts")
            out.append((str(PurePosixPath(*parts[strip_prefix:]).with_suffix("")), os.fspath(root / rel)))
    if not out:
        raise UserError(f"{split_list}: split list is empty")
    return out


def sources_from_arrays(images: Sequence[np.ndarray], labels: Sequence[int], class_dirs: Optional[Sequence[str]] = None,
                        prefix: str = "img") -> list[tuple[str, np.ndarray]]:
    """Sources from in-memory images (e.g. scikit-learn digits scaled to uint8): image i goes
    to `<class_dirs[labels[i]]>/<prefix>_<i:06d>`; class_dirs default to the label as text."""
    if len(images) != len(labels):
        raise UserError(f"{len(images)} images but {len(labels)} labels")
    out = []
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = class_dirs[int(y)] if class_dirs is not None else str(int(y))
        out.append((f"{d}/{prefix}_{i:06d}", np.asarray(img)))
    return out
