"""Backbones (open_clip ViT, transformers CLIPVisionModel / ViTModel), heads and PEFT.

Public API:
    build_classifier(model_cfg, tuning_cfg, num_classes, classnames=None, load_weights=True)
    ImageClassifier, tiny_model_config(family), tiny_variant(model_cfg), default_lora_targets(family)
    preprocess_for(model_cfg)
"""

import contextlib
import dataclasses
import logging

import torch

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models.classifier import ImageClassifier, build_classifier, tiny_model_config, tiny_variant
from ft_focal.models.heads import CosineHead
from ft_focal.models.tuning import AdaptFormerMLP, default_lora_targets


def preprocess_for(model_cfg: ModelConfig) -> dict:
    """The backbone's input preprocessing (image size, mean / std, interpolation), without weights.

    The architecture is built on the meta device (no memory, no file reads beyond a config), so
    the data pipeline can be set up before the real model is loaded.
    """
    spec = dataclasses.replace(model_cfg, head_init="random")
    with torch.device("meta"), _quiet():  # a throwaway model: its "model ..." line would mislead
        model = build_classifier(spec, TuningConfig(method="head"), 2, None, load_weights=False)
    return dict(model.preprocess)


@contextlib.contextmanager
def _quiet():
    """Hold back ft_focal's INFO lines (warnings still pass)."""
    log = logging.getLogger("ft_focal")  # the package root: every ft_focal module logs under it
    level = log.level
    log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(level)


__all__ = [
    "preprocess_for",
    "AdaptFormerMLP",
    "CosineHead",
    "ImageClassifier",
    "build_classifier",
    "default_lora_targets",
    "tiny_model_config",
    "tiny_variant",
]
