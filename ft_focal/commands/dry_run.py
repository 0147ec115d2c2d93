"""`ft-focal train RECIPE --dry-run`: build everything a recipe asks for, small, and say what the real run loads.

`dry_run` builds everything the recipe asks for with a tiny backbone of the SAME family
(same head, tuning method, loss, optimizer, precision) and synthetic images with the recipe's
real class count, runs two updates and one evaluation, and prints what the real run would load
(ft_focal/training/preflight.py describes the real run; every missing path is listed, none is fatal).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ft_focal.config import Recipe
from ft_focal.data import synthetic_bundle
from ft_focal.models import preprocess_for, tiny_variant
from ft_focal.training.preflight import missing_paths, real_class_count, real_parameter_counts, train_image_count
from ft_focal.training.trainer import train


def dry_run(recipe: Recipe, output_dir: Optional[str] = None, train_size: int = 48, eval_size: int = 24) -> dict:
    """Two updates and one evaluation of a tiny same-family stand-in; prints the real run's plan."""
    num_classes = real_class_count(recipe)
    missing = missing_paths(recipe)
    counts = real_parameter_counts(recipe, num_classes)
    train_images, unknown_because = train_image_count(recipe)
    batch = 4 * recipe.train.grad_accum_steps
    with tempfile.TemporaryDirectory(prefix="ft_focal_dry_run_") as tmp:
        tiny = dataclasses.replace(
            recipe,
            output_dir=output_dir or str(Path(tmp) / "run"),
            model=tiny_variant(recipe.model),
            train=dataclasses.replace(recipe.train, max_steps=2, batch_size=batch, eval_batch_size=16,
                                      save_every_steps=1000, log_every_steps=1, mixed_precision=cpu_precision(recipe),
                                      # compiling the tiny stand-in with inductor on the CPU takes minutes and
                                      # says nothing about the real run's GPU graphs
                                      compile=False),
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
        "train_images_unknown": unknown_because,
        "updates_per_epoch": None if train_images is None else train_images // recipe.train.batch_size,
        "missing_paths": missing,
        "dry_run_updates": results["updates"],
        "dry_run_pass_counts": results["pass_counts"],
        "compile": recipe.train.compile,
        # the tiny stand-in that ran; for timm a model that does not take the tiny sizes is
        # replaced by a plain tiny ViT (ft_focal/models/backbones/timm.py), recorded here
        "dry_run_model": tiny.model.name,
        "dry_run_model_swapped": recipe.model.family == "timm" and tiny.model.name != recipe.model.name,
    }
    print(format_plan(plan))
    return plan


def cpu_precision(recipe: Recipe) -> str:
    """fp16 autocast is a GPU feature; on the CPU the dry run exercises the bf16 path instead."""
    if torch.cuda.is_available() or recipe.train.mixed_precision == "no":
        return recipe.train.mixed_precision
    return "bf16"


def _unknown(plan: dict) -> str:
    return f"unknown ({plan.get('train_images_unknown') or 'not counted'})"


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
        f"  train images: {plan['train_images'] if plan['train_images'] is not None else _unknown(plan)}"
        f", updates per epoch {plan['updates_per_epoch'] if plan['updates_per_epoch'] is not None else 'unknown'}",
    ]
    if plan.get("dry_run_model_swapped"):
        lines.append(f"  stand-in:     {plan['dry_run_model']} ran INSTEAD of a tiny {plan['model']} (it does not "
                     "build at tiny sizes): the dry run did not exercise this architecture")
    if plan.get("compile"):
        lines.append("  train.compile: the real run compiles the model (inductor); the dry run ran it eagerly")
    if plan["missing_paths"]:
        lines.append(f"  a real run would stop: {len(plan['missing_paths'])} missing path(s):")
        lines += [f"    - {m}" for m in plan["missing_paths"]]
    else:
        lines.append("  all weights / data paths exist")
    return "\n".join(lines)
