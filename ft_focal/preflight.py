"""Checks before a real run, and `ft-focal train RECIPE --dry-run`.

`missing_paths` lists EVERY weights / data path a recipe names that is not on disk, so a real
run reports them all at once before anything heavy starts.

`dry_run` builds everything the recipe asks for with a tiny backbone of the SAME family
(same head, tuning method, loss, optimizer, precision) and synthetic images with the recipe's
real class count, runs two updates and one evaluation, and prints what the real run would load.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ft_focal.config import Recipe
from ft_focal.errors import UserError

logger = logging.getLogger("ft_focal")


def _weights_path(pretrained: Optional[str]) -> Optional[Path]:
    if not pretrained:
        return None
    if pretrained.startswith("local-dir:"):
        return Path(pretrained[len("local-dir:"):])
    return Path(pretrained)


def missing_paths(recipe: Recipe) -> list[str]:
    """'key: path' for every file or folder the recipe names that does not exist."""
    data = recipe.data
    checks = [("model.pretrained", _weights_path(recipe.model.pretrained))]
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
    return [f"{key}: {path}" for key, path in checks if path is not None and not path.exists()]


def check_paths(recipe: Recipe) -> None:
    missing = missing_paths(recipe)
    if missing:
        raise UserError(f"{len(missing)} path(s) of the recipe do not exist: " + "; ".join(missing))


def _data_file(value: Optional[str], root: Optional[str]) -> Optional[Path]:
    """A list / classnames path as the data code reads it: `builtin:` resource, as given, or under root."""
    if not value:
        return None
    if value.startswith("builtin:"):
        from ft_focal.data.splits import RESOURCES

        return RESOURCES / value[len("builtin:"):]
    path = Path(value)
    if not path.is_absolute() and not path.exists() and root:
        path = Path(root) / path
    return path


def _count_lines(path: Optional[str], root: Optional[str]) -> Optional[int]:
    file = _data_file(path, root)
    if file is None or not file.is_file():
        return None
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as handle:
        return sum(1 for line in handle if line.strip())


def real_class_count(recipe: Recipe) -> int:
    if recipe.data.num_classes:
        return recipe.data.num_classes
    count = _count_lines(recipe.data.classnames, recipe.data.root)
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


def dry_run(recipe: Recipe, output_dir: Optional[str] = None, train_size: int = 48, eval_size: int = 24) -> dict:
    """Two updates and one evaluation of a tiny same-family stand-in; prints the real run's plan."""
    from ft_focal.data import synthetic_bundle
    from ft_focal.models import preprocess_for, tiny_variant
    from ft_focal.train import train

    num_classes = real_class_count(recipe)
    missing = missing_paths(recipe)
    counts = real_parameter_counts(recipe, num_classes)
    train_images = _count_lines(recipe.data.train_list, recipe.data.root)
    batch = max(recipe.train.grad_accum_steps, 4 * recipe.train.grad_accum_steps)
    with tempfile.TemporaryDirectory(prefix="ft_focal_dry_run_") as tmp:
        tiny = dataclasses.replace(
            recipe,
            output_dir=output_dir or str(Path(tmp) / "run"),
            model=tiny_variant(recipe.model),
            train=dataclasses.replace(recipe.train, max_steps=2, batch_size=batch, eval_batch_size=16,
                                      save_every_steps=1000, log_every_steps=1, mixed_precision=_cpu_precision(recipe)),
            data=dataclasses.replace(recipe.data, num_workers=0),
            hub=dataclasses.replace(recipe.hub, push=False),
        )
        preprocess = preprocess_for(tiny.model)
        bundle = synthetic_bundle(num_classes, preprocess, train_size, eval_size, recipe.seed)
        results = train(tiny, bundle=bundle)
    plan = {
        "recipe": recipe.name,
        "family": recipe.model.family,
        "model": recipe.model.name,
        "weights": recipe.model.pretrained,
        "tuning": recipe.tuning.method,
        "optimizer": recipe.optim.name,
        "classes": num_classes,
        "parameters": counts,
        "train_images": train_images,
        "updates_per_epoch": None if train_images is None else train_images // recipe.train.batch_size,
        "missing_paths": missing,
        "dry_run_updates": results["updates"],
        "dry_run_pass_counts": results["pass_counts"],
    }
    print(format_plan(plan))
    return plan


def _cpu_precision(recipe: Recipe) -> str:
    """fp16 autocast is a GPU feature; on the CPU the dry run exercises the bf16 path instead."""
    if torch.cuda.is_available() or recipe.train.mixed_precision == "no":
        return recipe.train.mixed_precision
    return "bf16"


def format_plan(plan: dict) -> str:
    params = plan["parameters"]
    if params:
        share = 100 * params["trainable"] / max(1, params["total"])
        param_text = f"{params['trainable']:,} trainable / {params['total']:,} total ({share:.2f}%)"
    else:
        param_text = "unknown"
    lines = [
        f"dry run OK: {plan['recipe']} ({plan['dry_run_updates']} updates, passes {plan['dry_run_pass_counts']})",
        f"  real model:   {plan['family']} {plan['model']}, weights {plan['weights'] or 'random init'}",
        f"  tuning:       {plan['tuning']}, parameters {param_text}",
        f"  optimizer:    {plan['optimizer']}; classes {plan['classes']}",
        f"  train images: {plan['train_images'] if plan['train_images'] is not None else 'unknown (list not on disk)'}"
        f", updates per epoch {plan['updates_per_epoch'] if plan['updates_per_epoch'] is not None else 'unknown'}",
    ]
    if plan["missing_paths"]:
        lines.append(f"  a real run would stop: {len(plan['missing_paths'])} missing path(s):")
        lines += [f"    - {m}" for m in plan["missing_paths"]]
    else:
        lines.append("  all weights / data paths exist")
    return "\n".join(lines)
