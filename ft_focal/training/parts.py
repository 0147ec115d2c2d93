"""The parts of one run, built from its recipe in the order the data flows (docs/design.md):
accelerator -> data (+ class counts) -> model (+ PEFT, head init, DDP / FSDP2) -> loss -> optimizer
-> LR schedule. `build_run` is the whole of the Trainer's setup; the Trainer then holds the
`RunParts` and its `TrainState` (ft_focal/training/trainer.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ft_focal.config import Recipe, save_recipe
from ft_focal.errors import UserError
from ft_focal.training.builders import (
    build_loss_from,
    build_optimizer_from,
    clip_final_gradient,
    compile_model,
    lr_lambda,
    make_accelerator,
)
from ft_focal.training.fsdp import prepare_model
from ft_focal.training.malloc import keep_freed_memory
from ft_focal.training.preflight import check_paths
from ft_focal.training.sampling import steps_per_epoch
from ft_focal.training.zero_shot import is_zero_shot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunParts:
    """What a run is made of.

    accelerator: the run's Accelerator. data: the DataBundle (train / val / test, class names).
    class_counts: images per class in the TRAINING split ([C]; the optimizers and losses use them).
    preprocess: the model's preprocessing dict. model: the classifier itself; wrapped: what the loop
    calls (DDP, FSDP2 or compiled; the model itself otherwise). loss: the per-sample loss. optimizer:
    the SAM-family optimizer, one `step` per update. schedule: the LR schedule, stepped per update.
    steps_per_epoch, total_steps: updates per epoch and in the whole run.
    """

    accelerator: Any
    data: Any
    class_counts: list[int]
    preprocess: dict
    model: torch.nn.Module
    wrapped: torch.nn.Module
    loss: torch.nn.Module
    optimizer: Any
    schedule: Any
    steps_per_epoch: int
    total_steps: int


def build_run(recipe: Recipe, bundle: Any = None,
              after_head_init: Optional[Callable[[torch.nn.Module, Any], None]] = None) -> RunParts:
    """The run's parts. `bundle`: prebuilt datasets (tests, the dry run), None = the recipe's data.
    `after_head_init(model, accelerator)` sees the whole initial model, before any sharding."""
    accelerator = _start(recipe, check_data=bundle is None)
    cfg = recipe.train
    preprocess = _preprocess_for(recipe)
    bundle = bundle or _build_datasets(recipe, preprocess)
    counts = list(bundle.class_counts)
    per_epoch = steps_per_epoch(len(bundle.train), cfg.batch_size)
    if per_epoch == 0 and not is_zero_shot(cfg):
        raise UserError(f"recipe key 'train.batch_size' ({cfg.batch_size}) exceeds the training set "
                        f"({len(bundle.train)} images)")
    total = cfg.epochs * per_epoch if cfg.max_steps is None else cfg.max_steps
    logger.info("data: %d train / %s val / %d test images, %d classes, %d updates per epoch, %d in all",
                len(bundle.train), len(bundle.val) if bundle.val is not None else "no", len(bundle.test),
                bundle.num_classes, per_epoch, total)

    from ft_focal.models import build_classifier

    model = build_classifier(recipe.model, recipe.tuning, bundle.num_classes, bundle.classnames)
    loss = build_loss_from(recipe, counts).to(accelerator.device)
    # DDP, or FSDP2 (train.fsdp); the head is initialised (and handed to after_head_init) before sharding
    hook = (lambda m: after_head_init(m, accelerator)) if after_head_init is not None else None
    wrapped = prepare_model(model, recipe, bundle, accelerator, after_head_init=hook)
    optimizer = build_optimizer_from(recipe, model, wrapped, counts, accelerator)
    if cfg.compile:   # after the optimizer: its one-backward path swaps layer classes first
        wrapped = compile_model(wrapped)
    if cfg.grad_clip:
        clip_final_gradient(optimizer, model, cfg.grad_clip)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total))
    return RunParts(accelerator, bundle, counts, preprocess, model, wrapped, loss, optimizer, schedule,
                    per_epoch, total)


def _start(recipe: Recipe, check_data: bool) -> Any:
    """Paths, threads, determinism, the Accelerator and the seeds; the resolved recipe saved."""
    from accelerate.utils import set_seed

    cfg = recipe.train
    # Every missing path the run will read (weights; data unless prebuilt) at once, before anything heavy.
    check_paths(recipe, data=check_data)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # before the accelerator touches CUDA: cuBLAS reads this at init
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_accelerator(recipe)
    if accelerator.device.type == "cpu":
        # Reuse each step's freed activation buffers instead of page-faulting them in again
        # (ft_focal/training/malloc.py: ~50 000 faults per step on a small CLIP otherwise).
        keep_freed_memory()
    set_seed(recipe.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    world = accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"recipe key 'train.batch_size' ({cfg.batch_size}) must be divisible by "
                        f"processes x grad_accum_steps = {world * cfg.grad_accum_steps}")
    if accelerator.is_main_process:
        save_recipe(recipe, Path(recipe.output_dir) / "recipe.yaml")
    return accelerator


def _preprocess_for(recipe: Recipe) -> dict:
    from ft_focal.models import preprocess_for

    return preprocess_for(recipe.model)


def _build_datasets(recipe: Recipe, preprocess: dict) -> Any:
    from ft_focal.data.build import build_datasets

    return build_datasets(recipe.data, preprocess, recipe.seed)
