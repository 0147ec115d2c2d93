"""Vision backbones, one module per family: open_clip.py (open_clip ViT), hf.py (transformers
CLIPVisionModel / ViTModel); common.py holds what they share.

Every backbone is wrapped in a small module whose `forward(pixel_values)` returns the feature
of the CLIP fine-tuning protocol (docs/algorithms.md): the CLS token after the final LayerNorm,
WITHOUT CLIP's projection. `load_backbone` returns a `LoadedBackbone`: the module, its feature
size, the preprocessing dict, a text encoder (a callable mapping prompts to unit-norm text
embeddings already mapped into the feature space through proj^T) when the checkpoint has a
text tower, and the resolved architecture (so the model can be rebuilt without any file).

Weights come only from disk (open_clip file or `local-dir:`, transformers directories, or
the local HF cache for an open_clip tag / hub id when the user has it); nothing is downloaded
on purpose, and every user mistake is a one-line `UserError` naming `model.<key>`.

A new family is one more module here defining `FAMILIES = {"<model.family>": loader}`, where
`loader(model_cfg, load_weights) -> LoadedBackbone`; `load_backbone` finds it by itself.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Callable

from ft_focal.errors import UserError
from ft_focal.models.backbones.common import LoadedBackbone

__all__ = ["LoadedBackbone", "load_backbone", "loaders", "default_bottleneck"]


def loaders() -> dict[str, Callable[..., LoadedBackbone]]:
    """`model.family` -> loader, from every family module of this package (imported on first use)."""
    found: dict[str, Callable[..., LoadedBackbone]] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name != "common":
            found.update(importlib.import_module(f"{__name__}.{module.name}").FAMILIES)
    return found


def load_backbone(model_cfg, load_weights: bool = True) -> LoadedBackbone:
    families = loaders()
    try:
        loader = families[model_cfg.family]
    except KeyError:
        raise UserError(
            f"model.family: '{model_cfg.family}' is not one of {', '.join(families)}"
        ) from None
    return loader(model_cfg, load_weights)


def default_bottleneck(num_classes: int) -> int:
    """2^max(0, floor(log2(C / 24))) (docs/algorithms.md; LIFT's rule for 12-layer ViTs)."""
    if num_classes <= 0:
        return 1
    return 2 ** max(0, math.floor(math.log2(num_classes / 24)))
