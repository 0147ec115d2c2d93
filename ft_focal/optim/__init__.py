"""Sharpness-aware optimizers for long-tailed fine-tuning (imports nothing else from ft_focal).

Every optimizer wraps a base optimizer and is driven by one call per training step::

    opt = FocalSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.5, lam=0.8,
                   class_counts=counts, lr=0.01, momentum=0.9, weight_decay=5e-4)
    def closure():                       # forward at the CURRENT weights
        return criterion(model(x), y)    # per-sample losses [B] (reduction='none')
    loss = opt.step(closure, targets=y)  # all passes, one base step; mean loss at w (detached)

A method's file (focal_sam.py ...) holds its passes; ``_step.py`` the step around them (closure
contract, micro-batch lists); ``_wrapping.py`` the options every method shares (backward=, scaler=,
model=, no_sync=, sync_perturbation=, sharded=); ``registry.py`` the methods (names, recipe keys,
citations); docs/algorithms.md the update rules.
Cost per step (``opt.last_pass_counts``): ERM 1F+1B, SAM/ASAM 2F+2B, ImbSAM 2F+3B, Focal-SAM 2F+3B,
Focal-SAM / ImbSAM with ``one_backward=True`` 2F+2B, SSE-SAM 3F+4B (2F+3B after the switch),
CC-SAM (1+K_b)F + 2K_b B for K_b classes in the batch.
"""
from __future__ import annotations

import torch

from ._runtime import Runtime
from ._step import SharpnessOptimizer
from ._wrapping import COMMON_KWARGS, RENAMED_KEYWORDS
from .ccsam import CCSAM
from .erm import ERM
from .focal_sam import FocalSAM
from .imbsam import ImbSAM
from .registry import METHODS, ONE_BACKWARD_METHODS, RECIPE_KEYS, MethodInfo, method_info
from .sam import SAM
from .sse_sam import SSESAM

__all__ = ["ERM", "SAM", "ImbSAM", "CCSAM", "FocalSAM", "SSESAM", "SharpnessOptimizer", "Runtime",
           "OPTIMIZERS", "BASE_OPTIMIZERS", "BASE_KWARGS", "COMMON_KWARGS", "build_optimizer",
           "optimizer_kwargs", "METHODS", "MethodInfo", "RECIPE_KEYS", "ONE_BACKWARD_METHODS", "method_info"]

# name -> class, read from the registry (ft_focal/optim/registry.py)
OPTIMIZERS = {name: info.cls for name, info in METHODS.items()}

BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
# keyword -> the base optimizers that use it (others ignore it, so one config section serves all)
BASE_KWARGS = {"lr": ("sgd", "adamw", "adam"), "weight_decay": ("sgd", "adamw", "adam"),
               "momentum": ("sgd",), "nesterov": ("sgd",), "betas": ("adamw", "adam"),
               "fused": ("sgd", "adamw", "adam")}


def optimizer_kwargs(name: str) -> tuple:
    """The method keywords ``build_optimizer(name, ...)`` accepts besides ``base``, the base
    optimizer keywords (``BASE_KWARGS``) and the runtime options (``COMMON_KWARGS``)."""
    info = method_info(name)
    return tuple(k for k in info.cls.method_kwargs if k not in ("class_counts", "classifier_params")
                 and k not in info.fixed)


def build_optimizer(name: str, params, class_counts=None, **cfg) -> SharpnessOptimizer:
    """Build optimizer ``name`` ("erm", "sam", "asam", "imbsam", "ccsam", "focal_sam", "sse_sam").

    ``cfg``: ``base`` ("sgd" | "adamw" | "adam", default "sgd"), base keywords ``lr``, ``momentum``,
    ``weight_decay``, ``nesterov``, ``betas``, ``fused`` (those the chosen base does not use, or set
    to None, are ignored; ``fused=True`` skips non-finite steps on the device), the method keywords
    (``optimizer_kwargs(name)``, plus ``classifier_params`` for CC-SAM) and the runtime options
    ``backward``, ``scaler``, ``backward_applies_scaler``, ``model``, ``no_sync``,
    ``sync_perturbation``, ``sharded``. An unknown name or keyword raises ValueError naming it and
    listing the valid ones.
    """
    info = method_info(name)
    cls = info.cls
    base = cfg.pop("base", "sgd")
    if base not in BASE_OPTIMIZERS:
        raise ValueError(f"unknown base optimizer {base!r}; valid: {', '.join(BASE_OPTIMIZERS)}")
    method = set(optimizer_kwargs(name)) | ({"classifier_params"} if info.needs_classifier_params else set())
    valid = method | set(BASE_KWARGS) | set(COMMON_KWARGS)
    valid |= {old for old, new in RENAMED_KEYWORDS.items() if new in method}   # the class warns
    for k in cfg:
        if k not in valid:
            raise ValueError(f"unknown keyword {k!r} for optimizer {name!r}; valid: {', '.join(sorted(valid))}")
    kwargs = dict(info.fixed)
    for k, v in cfg.items():
        if k in BASE_KWARGS and (base not in BASE_KWARGS[k] or v is None):
            continue
        kwargs[k] = tuple(v) if k == "betas" else v
    if "class_counts" in cls.method_kwargs:
        if class_counts is None:
            raise ValueError(f"optimizer {name!r} needs class_counts (training-set counts per class)")
        kwargs["class_counts"] = class_counts
    return cls(params, BASE_OPTIMIZERS[base], **kwargs)
