"""Checks before a run: every path a recipe names, and what a dry run needs to know about the real run.

`missing_paths` lists EVERY weights / data path a recipe names that is not on disk, so a real
run reports them all at once before anything heavy starts (`check_paths`, called by the Trainer).
`real_class_count`, `real_parameter_counts` and `count_lines` describe the real run for the dry
run (`ft-focal train RECIPE --dry-run`: ft_focal/commands/dry_run.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
from pathlib import Path
from typing import Optional

import torch

from ft_focal.config import Recipe
from ft_focal.data.splits import RESOURCES
from ft_focal.errors import UserError

logger = logging.getLogger(__name__)


def _weights_path(pretrained: Optional[str]) -> Optional[Path]:
    if not pretrained:
        return None
    if pretrained.startswith("local-dir:"):
        return Path(pretrained[len("local-dir:"):])
    return Path(pretrained)


def missing_paths(recipe: Recipe, data: bool = True) -> list[str]:
    """'key: path' for every file or folder the recipe names that does not exist (the weights,
    and with `data` the data section's root / lists / class names)."""
    checks = [("model.pretrained", _weights_path(recipe.model.pretrained))]
    if data:
        checks += _data_checks(recipe)
    return [f"{key}: {path}" for key, path in checks if path is not None and not path.exists()]


def _data_checks(recipe: Recipe) -> list[tuple[str, Optional[Path]]]:
    data = recipe.data
    checks: list[tuple[str, Optional[Path]]] = []
    root = Path(data.root) if data.root else None
    if data.dataset in ("split_file", "image_folder", "cifar_lt"):
        checks.append(("data.root", root))
    if data.dataset == "hf" and data.hf_path:
        checks.append(("data.hf_path", Path(data.hf_path)))
    # synthetic data reads no file: leftover list / classnames keys of the recipe do not matter
    for key in () if data.dataset == "synthetic" else ("train_list", "val_list", "test_list", "classnames"):
        path = _data_file(getattr(data, key), data.root)
        if path is not None:
            checks.append((f"data.{key}", path))
    return checks


def check_paths(recipe: Recipe, data: bool = True) -> None:
    """One UserError naming every missing path (`missing_paths`), if any."""
    missing = missing_paths(recipe, data)
    if missing:
        raise UserError(f"{len(missing)} path(s) of the recipe do not exist: " + "; ".join(missing))


def _data_file(value: Optional[str], root: Optional[str]) -> Optional[Path]:
    """A list / classnames path as the data code reads it: `builtin:` resource, as given, or under root."""
    if not value:
        return None
    if value.startswith("builtin:"):
        return RESOURCES / value[len("builtin:"):]
    path = Path(value)
    if not path.is_absolute() and not path.exists() and root:
        path = Path(root) / path
    return path


def count_lines(path: Optional[str], root: Optional[str]) -> Optional[int]:
    file = _data_file(path, root)
    if file is None or not file.is_file():
        return None
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as handle:
        return sum(1 for line in handle if line.strip())


def train_image_count(recipe: Recipe) -> tuple[Optional[int], str]:
    """(number of training images of the real run, or None; why it is unknown).

    Split lists are counted by their lines; data that ships with the package or is generated
    (digits-LT, synthetic) is built, which takes a second; other sources (image folders, CIFAR,
    Hugging Face datasets) only when they are on disk, else None with the reason."""
    data = recipe.data
    if data.train_list:
        count = count_lines(data.train_list, data.root)
        return count, "" if count is not None else "list not on disk"
    if data.dataset in ("digits_lt", "synthetic") or (data.dataset in ("image_folder", "cifar_lt")
                                                      and data.root and Path(data.root).exists()):
        from ft_focal.data.build import build_datasets

        preprocess = {"image_size": data.image_size or 32, "mean": [0.0] * 3, "std": [1.0] * 3,
                      "interpolation": "bilinear"}
        try:
            return len(build_datasets(data, preprocess, recipe.seed).train), ""
        except UserError as exc:
            return None, f"data not readable: {exc}"
    return None, "data not on disk" if data.dataset != "hf" else "a Hugging Face dataset (not opened by a dry run)"


def real_class_count(recipe: Recipe) -> int:
    if recipe.data.num_classes:
        return recipe.data.num_classes
    count = count_lines(recipe.data.classnames, recipe.data.root)
    if count:
        return count
    if recipe.data.dataset in ("digits_lt",):
        return 10
    if recipe.data.dataset == "synthetic":
        return recipe.data.synthetic_num_classes
    raise UserError("dry run: set 'data.num_classes' (or a 'data.classnames' file that exists) for the class count")


def real_parameter_counts(recipe: Recipe, num_classes: int) -> Optional[dict]:
    """Parameter counts of the REAL architecture, built on the meta device (no memory, no weights)."""
    from ft_focal.models import build_classifier

    model_cfg = dataclasses.replace(recipe.model, pretrained=None, head_init="random")
    try:
        with torch.device("meta"):
            model = build_classifier(model_cfg, recipe.tuning, num_classes, None, load_weights=False)
        return model.parameter_counts()
    except Exception as exc:  # counting is informative only
        logger.info("could not count the real model's parameters on the meta device: %s", exc)
        return None
