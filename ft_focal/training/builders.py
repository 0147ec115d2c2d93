"""What the training loop builds from a recipe: the Accelerator, the loss, the optimizer, the LR schedule.

Kept apart from ft_focal/training/trainer.py so that the Trainer there reads as the order of events only.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ft_focal.config import Recipe
from ft_focal.errors import UserError
from ft_focal.losses import LOSSES, build_loss
from ft_focal.optim import ONE_BACKWARD_METHODS, RECIPE_KEYS, build_optimizer, method_info

logger = logging.getLogger(__name__)

# Optimizer-specific recipe keys, passed to the optimizer only when set (not null): the method
# registry (ft_focal/optim/registry.py). Loss keys: the loss registry (ft_focal/losses/__init__.py).
METHOD_KEYS = RECIPE_KEYS
LOSS_KEYS = {name: tuple(key for key, _ in info.recipe_keys) for name, info in LOSSES.items() if info.alias_of is None}


def check_trackers(names: list) -> list[str]:
    """`train.log_with` as Accelerate tracker names; a one-line error for an unknown or missing one."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    wanted = [str(n) for n in names]
    for name in wanted:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"recipe key 'train.log_with': unknown tracker '{name}' "
                            f"(valid: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name not in available:
            raise UserError(f"recipe key 'train.log_with': tracker '{name}' is not installed (pip install {name})")
    return list(dict.fromkeys(wanted))


def make_accelerator(recipe: Recipe) -> Any:
    """The run's Accelerator: the recipe's precision, and the trackers it names (none by default).

    Nothing is switched on because a package happens to be importable: only `train.log_with`.
    """
    from accelerate.utils import ProjectConfiguration

    from ft_focal.training.accelerator import make_accelerator as accelerator_for

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # `accelerate launch --mixed_precision`
    if launched and launched != recipe.train.mixed_precision:
        logger.warning("accelerate launch asked for mixed precision '%s' but the recipe's "
                       "train.mixed_precision is '%s': the recipe wins (override it with train.mixed_precision=%s)",
                       launched, recipe.train.mixed_precision, launched)
    trackers = check_trackers(recipe.train.log_with or [])
    return accelerator_for(
        mixed_precision=recipe.train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir,
                                            logging_dir=str(Path(recipe.output_dir) / "logs")),
    )


def build_loss_from(recipe: Recipe, class_counts: list[int]) -> torch.nn.Module:
    """The recipe's per-sample loss over the training class counts."""
    cfg = recipe.loss
    kwargs = {kwarg: getattr(cfg, key) for key, kwarg in LOSSES[cfg.name].recipe_keys if getattr(cfg, key) is not None}
    try:
        return build_loss(cfg.name, class_counts, **kwargs)
    except ValueError as exc:
        raise UserError(f"recipe section 'loss': {exc}") from None


def method_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The method keys set in the recipe that `optim.name` takes.

    A recipe written for one method keeps its keys when `optim.name=...` switches to another
    (`optim.name=sam` on a Focal-SAM recipe): keys the new method does not take are dropped, with
    one line naming them, instead of failing the run.
    """
    cfg = recipe.optim
    taken = set(method_info(cfg.name).recipe_keys)
    method = {key: getattr(cfg, key) for key in METHOD_KEYS if getattr(cfg, key) is not None}
    dropped = [key for key in method if key not in taken]
    if dropped:
        logger.info("optim.name=%s does not take %s: ignored", cfg.name,
                    ", ".join(f"optim.{key}={method[key]}" for key in dropped))
    method = {key: value for key, value in method.items() if key in taken}
    if cfg.name in ONE_BACKWARD_METHODS:
        # Exact either way; null = "auto": the cheaper one-backward path wherever every trainable
        # parameter has a layer rule (LoRA, AdaptFormer, heads), the exact path otherwise.
        method["one_backward"] = "auto" if cfg.one_backward is None else cfg.one_backward
    elif cfg.one_backward:
        logger.info("optim.name=%s does not take optim.one_backward=true (only %s do): ignored",
                    cfg.name, ", ".join(ONE_BACKWARD_METHODS))
    return method


def build_optimizer_from(recipe: Recipe, model: torch.nn.Module, wrapped: torch.nn.Module, class_counts: list[int],
                         accelerator: Any) -> Any:
    """The recipe's optimizer over the trainable parameters, wired to Accelerate."""
    cfg = recipe.optim
    base_kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.base == "sgd":
        base_kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.fused if cfg.fused is not None else accelerator.device.type == "cuda":
        base_kwargs["fused"] = True   # skips a non-finite update on the device: no host read per update
    method = method_kwargs(recipe)
    if method_info(cfg.name).needs_classifier_params:
        method["classifier_params"] = list(model.head.parameters())
    runtime: dict[str, Any] = {"model": model, "sync_perturbation": cfg.sync_perturbation}
    if accelerator.num_processes > 1 and not recipe.train.fsdp:   # FSDP2: the optimizer sees DTensors
        runtime["no_sync"] = lambda: accelerator.no_sync(wrapped)
    if accelerator.scaler is not None:  # fp16: accelerator.backward scales the loss itself
        runtime.update(scaler=accelerator.scaler, backward=accelerator.backward, backward_applies_scaler=True)
    else:
        runtime["backward"] = accelerator.backward
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the recipe's tuning leaves no trainable parameter (check 'tuning.method')")
    try:
        return build_optimizer(cfg.name, params, class_counts, base=cfg.base, **base_kwargs, **method, **runtime)
    except (ValueError, TypeError) as exc:
        raise UserError(f"recipe section 'optim': {exc}") from None


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at update `step`: linear warm-up, then cosine / linear / constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def compile_model(wrapped: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` set up for the SAM family (train.compile)."""
    # The SAM family back-propagates one forward graph twice (the official ImbSAM / Focal-SAM /
    # SSE-SAM steps, the one-backward path's first-step check): AOT autograd's donated buffers
    # would make that second backward fail.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    # Start from an empty cache: code compiled earlier in this process for another model object
    # must not be reused. Build the optimizer first: the one-backward path swaps the classes of
    # the layers it covers (one_backward/__init__.py), and the compiled graphs should see those.
    torch._dynamo.reset()
    return torch.compile(wrapped)


def clip_final_gradient(optimizer: Any, model: torch.nn.Module, max_norm: float) -> None:
    """Clip the FINAL (descent) gradient, right before the base optimizer applies it."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def clip(*_: Any) -> None:
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)

    optimizer.base_optimizer.register_step_pre_hook(clip)
