"""`build_classifier`: backbone (+ PEFT) + head, the one model object the rest of ft_focal uses."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.errors import UserError
from ft_focal.models.backbones import default_bottleneck, load_backbone
from ft_focal.models.head_init import HEAD_INITS, text_head_weights
from ft_focal.models.heads import build_head, init_head_from_text
from ft_focal.models.tuning import apply_adaptformer, apply_lora, default_lora_targets, merge_lora_

logger = logging.getLogger(__name__)

TUNING_METHODS = ("full", "head", "lora", "adaptformer")


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class ImageClassifier(nn.Module):
    """logits = head(backbone(pixel_values)).

    backbone: module mapping [B, 3, H, W] to features [B, D] (CLS after the final norm, no proj).
    head: CosineHead or nn.Linear; its parameters are the "classifier" scope (CC-SAM).
    preprocess: {"image_size", "mean", "std", "interpolation"} of the backbone.
    rebuild_config: a ModelConfig with the resolved architecture (model.config) and no weights:
        build_classifier(clf.rebuild_config, tuning, C, load_weights=False) builds the same
        parameter names without reading any file.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, preprocess: dict, *, family: str,
                 tuning_method: str, feature_dim: int, num_classes: int,
                 rebuild_config: Optional[ModelConfig] = None, lora_config=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.preprocess = dict(preprocess)
        self.family = family
        self.tuning_method = tuning_method
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.rebuild_config = rebuild_config
        self.lora_config = lora_config
        self.lora_merged = False

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values))

    def parameter_counts(self) -> dict:
        params = list(self.parameters())
        return {
            "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
            "total": int(sum(p.numel() for p in params)),
        }

    def describe(self) -> str:
        c = self.parameter_counts()
        pct = 100.0 * c["trainable"] / max(1, c["total"])
        return f"trainable {_human(c['trainable'])} / total {_human(c['total'])} ({pct:.1f}%)"

    def lora_state_dict(self) -> dict:
        """LoRA weights in peft format (keys without the adapter name), for adapter_model.safetensors."""
        if self.lora_config is None or self.lora_merged:
            raise ValueError("this classifier has no (unmerged) LoRA adapter")
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.backbone)

    def merge_lora(self) -> "ImageClassifier":
        """Merge LoRA into the backbone weights in place (peft merge + unload); returns self.

        Afterwards the state_dict has the plain backbone names (as tuning.method=head/full)."""
        if self.lora_config is None or self.lora_merged:
            return self
        merge_lora_(self.backbone)
        self.lora_merged = True
        self.tuning_method = "merged_lora"
        return self


def _validate(model_cfg: ModelConfig, tuning_cfg: TuningConfig, num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"number of classes must be a positive integer, got {num_classes!r}")
    if tuning_cfg.method not in TUNING_METHODS:
        raise UserError(f"tuning.method: '{tuning_cfg.method}' is not one of {', '.join(TUNING_METHODS)}")
    if model_cfg.head not in ("cosine", "linear"):
        raise UserError(f"model.head: '{model_cfg.head}' is not one of cosine, linear")
    if model_cfg.head_init not in HEAD_INITS:
        raise UserError(f"model.head_init: '{model_cfg.head_init}' is not one of {', '.join(HEAD_INITS)}")
    if tuning_cfg.method == "head" and not tuning_cfg.train_head:
        raise UserError("tuning.train_head=false with tuning.method=head leaves nothing to train")
    if model_cfg.head == "cosine" and model_cfg.head_scale <= 0:
        raise UserError(f"model.head_scale: must be > 0, got {model_cfg.head_scale}")


def build_classifier(
    model_cfg: ModelConfig,
    tuning_cfg: TuningConfig,
    num_classes: int,
    classnames: Optional[list] = None,
    load_weights: bool = True,
) -> ImageClassifier:
    """Backbone from `model_cfg` (+ weights unless load_weights=False), head, PEFT of `tuning_cfg`.

    load_weights=False: the same architecture and parameter names with random init and no
    weight file read (then load_state_dict from a saved model). Architectures given only by a
    directory (local-dir:, transformers dir) read that directory's config file; use
    `clf.rebuild_config` to avoid even that.
    """
    _validate(model_cfg, tuning_cfg, num_classes)
    loaded = load_backbone(model_cfg, load_weights=load_weights)
    head = build_head(model_cfg.head, loaded.feature_dim, num_classes, model_cfg.head_scale)

    # ---- head initialisation from class-name text embeddings, then the text tower is dropped.
    # class_mean needs the training data: the training loop fills it (models/head_init.py).
    head_init_used = "random"
    if model_cfg.head_init == "text" and load_weights:
        reason = loaded.no_text_reason
        if classnames is None:
            reason = "no class names were given"
        elif len(classnames) != num_classes:
            raise UserError(
                f"class names: {len(classnames)} names for {num_classes} classes (check the classnames file)"
            )
        if loaded.text_encoder is not None and classnames is not None:
            weights = text_head_weights(loaded.text_encoder, classnames, model_cfg.prompt_template)
            init_head_from_text(head, weights)
            head_init_used = "text"
            logger.info("head initialised from text embeddings of %r (%d classes)",
                        model_cfg.prompt_template, num_classes)
        else:
            logger.warning("model.head_init=text is not possible (%s); the head starts random (a training run "
                           "initialises it from class means)", reason)
    loaded.text_encoder = None  # drop the text tower (closure) now

    backbone = loaded.module
    method = tuning_cfg.method
    lora_config = None
    for p in backbone.parameters():
        p.requires_grad_(method == "full")
    if method == "lora":
        lora_config = apply_lora(backbone, model_cfg.family, tuning_cfg)
    elif method == "adaptformer":
        bottleneck = tuning_cfg.adapter_bottleneck or default_bottleneck(num_classes)
        n = apply_adaptformer(
            loaded.blocks, loaded.mlp_attr, loaded.norm_attr, loaded.feature_dim, int(bottleneck),
            tuning_cfg.adapter_scale_init, getattr(tuning_cfg, "adapter_norm", "shared"),
        )
        logger.info("AdaptFormer in %d blocks, bottleneck %d, adapter_norm %s", n, bottleneck,
                    getattr(tuning_cfg, "adapter_norm", "shared"))
    for p in head.parameters():
        p.requires_grad_(bool(tuning_cfg.train_head))

    rebuild = dataclasses.replace(
        model_cfg, pretrained=None, config=copy.deepcopy(loaded.resolved_config), head_init="random"
    )
    clf = ImageClassifier(
        backbone, head, loaded.preprocess, family=model_cfg.family, tuning_method=method,
        feature_dim=loaded.feature_dim, num_classes=num_classes, rebuild_config=rebuild,
        lora_config=lora_config,
    )
    clf.head_init_used = head_init_used  # "text" or "random": what the head holds now
    logger.info("model %s/%s, tuning %s: %s", model_cfg.family, model_cfg.name, method, clf.describe())
    return clf


# --------------------------------------------------------------------------- tiny models

_TINY = {
    "open_clip": {
        "name": "tiny-open-clip-vit",
        "config": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16,
                           "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
        },
        "head_init": "text",
    },
    "hf_clip": {
        "name": "tiny-hf-clip-vision",
        "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "head_init": "random",
    },
    "hf_vit": {
        "name": "tiny-hf-vit",
        "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "head_init": "random",
    },
    # timm: tiny_variant keeps the recipe's timm model name with these sizes (tiny_timm_name)
    "timm": {
        "name": "vit_tiny_patch16_224",
        "config": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "head_init": "random",
    },
}


def tiny_model_config(family: str) -> dict:
    """ModelConfig kwargs of a tiny random-init model of `family` (tests, demo, dry runs).

    open_clip: ViT width 64, 2 layers, 4 heads, patch 8, image 32, with a 1-layer text tower
    (so head_init=text works, with random text weights)."""
    if family not in _TINY:
        raise UserError(f"model.family: '{family}' is not one of {', '.join(_TINY)}")
    spec = copy.deepcopy(_TINY[family])
    return {"family": family, "name": spec["name"], "pretrained": None, "config": spec["config"],
            "head": "cosine", "head_init": spec["head_init"]}


def tiny_variant(model_cfg: ModelConfig) -> ModelConfig:
    """Same family and head settings as `model_cfg`, tiny architecture, no weights (--dry-run)."""
    tiny = tiny_model_config(model_cfg.family)
    name = tiny["name"]
    if model_cfg.family == "timm":  # the same timm architecture (SigLIP pool, EVA RoPE) at tiny sizes
        from ft_focal.models.backbones.timm import tiny_timm_name

        name = tiny_timm_name(model_cfg.name, tiny["config"])
    return dataclasses.replace(model_cfg, name=name, config=tiny["config"], pretrained=None)


__all__ = ["ImageClassifier", "build_classifier", "tiny_model_config", "tiny_variant", "default_lora_targets"]
