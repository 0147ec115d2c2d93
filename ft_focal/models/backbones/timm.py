"""The timm family: any `timm.create_model` ViT (CLIP, ImageNet-21k, DINOv2, SigLIP, EVA-02), weights
from a local safetensors file.

The model is built with `pretrained=False, num_classes=0` (timm never downloads here) and
`model.config` as extra `create_model` kwargs (e.g. `img_size: 224` for DINOv2, whose default is
518). The feature is timm's pooled pre-logits feature, `forward_head(forward_features(x),
pre_logits=True)`: the CLS token after the final norm (CLIP, in21k, DINOv2), the attention-pool
output (SigLIP) or the fc-normed token average (EVA-02 MIM), D = `model.num_features`. There is no
text tower, so `head_init: text` falls back (see build_classifier).

Preprocessing: mean / std / interpolation from `timm.data.resolve_data_config` (the model's
pretrained_cfg), the image size from the built model's patch embedding (it follows an `img_size`
override, which the pretrained_cfg does not).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ft_focal.errors import UserError, one_line
from ft_focal.models.backbones.common import PREPROCESS_KEY, LoadedBackbone, make_preprocess

logger = logging.getLogger(__name__)

# The tiny stand-in when a timm model does not take the tiny ViT kwargs (classifier.py's table).
TINY_FALLBACK = "vit_tiny_patch16_224"


class TimmBackbone(nn.Module):
    """A timm model without classifier: forward([B, 3, H, W]) -> pooled pre-logits feature [B, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(pixel_values)
        return self.model.forward_head(tokens, pre_logits=True)


def _create(name: str, kwargs: dict) -> nn.Module:
    import timm

    if not isinstance(name, str) or not name:
        raise UserError("model.name: a timm model name is required, e.g. vit_base_patch16_clip_224.openai")
    arch = name.split(".", 1)[0]  # "arch.tag": the tag only selects a pretrained_cfg
    if not timm.is_model(arch):
        raise UserError(f"model.name: '{name}' is not a timm model (see timm.list_models())")
    try:
        # pretrained=False: weights come only from model.pretrained, never from the hub
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as exc:
        raise UserError(f"model.config: not valid kwargs for timm model '{name}' ({one_line(exc)})") from None


def _weights_file(pretrained: str) -> Path:
    """The safetensors file of `model.pretrained` (a file, or a folder holding model.safetensors)."""
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"model.pretrained: file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"model.pretrained: {path} is not a .safetensors file (the timm family loads safetensors only)")
    return path


def _filter_state_dict(state: dict, model: nn.Module) -> dict:
    """timm's own checkpoint filter of the model's module (converts original OpenCLIP / DINOv2 key
    layouts, resamples the position embedding to the model's img_size), then without the classifier
    weights of the file (e.g. CLIP's 512-d projection as `head`, in21k's 21843-way head): the
    classifier here is ft_focal's head."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = set(model.state_dict())
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    dropped = [k for k in state if k not in own and any(k == n or k.startswith(n + ".") for n in names)]
    if dropped:
        logger.info("timm weights: the file's classifier (%s) is not used", ", ".join(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def _load_weights(model: nn.Module, pretrained: str, name: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _weights_file(pretrained)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"model.pretrained: cannot read {path} ({one_line(exc)})") from None
    try:
        state = _filter_state_dict(state, model)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as exc:  # size mismatch, unconvertible layout
        raise UserError(f"model.pretrained: {path} does not fit timm model '{name}' ({one_line(exc)})") from None
    problems = []
    for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            problems.append(f"{len(keys)} {kind} keys (e.g. {keys[0]})")
    if problems:  # strict: a partial load would train from random blocks without saying so
        raise UserError(f"model.pretrained: {path} does not fit timm model '{name}': {', '.join(problems)}")
    logger.info("timm %s: weights loaded from %s", name, path)


def _preprocess(model: nn.Module, override: dict) -> dict:
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or data_cfg["input_size"][-1]
    return make_preprocess(
        override.get("size", override.get("image_size", size)),
        override.get("mean", data_cfg["mean"]),
        override.get("std", data_cfg["std"]),
        override.get("interpolation", data_cfg.get("interpolation") or "bicubic"),
    )


def load_timm(model_cfg, load_weights: bool) -> LoadedBackbone:
    """`model.family: timm`: model.name = a timm name (arch or arch.tag), model.config = create_model kwargs."""
    kwargs = dict(copy.deepcopy(model_cfg.config or {}))
    override = dict(kwargs.pop(PREPROCESS_KEY, None) or {})
    model = _create(model_cfg.name, kwargs)
    if load_weights and model_cfg.pretrained:
        _load_weights(model, model_cfg.pretrained, model_cfg.name)
    elif load_weights:
        logger.info("timm %s: random initialisation (model.pretrained is null)", model_cfg.name)
    blocks = list(getattr(model, "blocks", []) or [])
    if not hasattr(model, "forward_head") or not blocks:
        raise UserError(f"model.name: timm model '{model_cfg.name}' is not a ViT with `blocks` (ViT, EVA)")
    preprocess = _preprocess(model, override)
    resolved = kwargs  # the name + these kwargs rebuild the same architecture
    resolved[PREPROCESS_KEY] = {
        "size": preprocess["image_size"], "mean": preprocess["mean"], "std": preprocess["std"],
        "interpolation": preprocess["interpolation"],
    }
    return LoadedBackbone(
        module=TimmBackbone(model),
        feature_dim=int(model.num_features),
        preprocess=preprocess,
        resolved_config=resolved,
        text_encoder=None,
        no_text_reason="a timm backbone has no text tower",
        blocks=blocks,
        mlp_attr="mlp",
        norm_attr="norm2",
    )


def tiny_timm_name(name: Optional[str], tiny_kwargs: dict) -> str:
    """`name` when its timm constructor takes `tiny_kwargs` (img_size, patch_size, embed_dim, depth,
    num_heads), else a plain tiny ViT: a dry run then exercises the same architecture (SigLIP's
    attention pool, EVA's RoPE / SwiGLU) at tiny sizes."""
    import timm

    try:
        with torch.device("meta"):  # no memory, no init cost: only whether the kwargs are accepted
            timm.create_model(name, pretrained=False, num_classes=0, **tiny_kwargs)
        return name
    except Exception as exc:  # any failure: the plain tiny ViT is always valid, but say so
        logger.warning("timm model %r does not build at the dry run's tiny sizes (%s: %s); the dry run uses %s "
                       "instead, so it does not exercise %r's own architecture", name, type(exc).__name__,
                       str(exc).splitlines()[0][:160] if str(exc) else "", TINY_FALLBACK, name)
        return TINY_FALLBACK


def use_lora_in_fused_qkv(backbone: nn.Module) -> None:
    """EVA attention with fused qkv and separate q / v biases calls `F.linear(x, self.qkv.weight, bias)`
    unless `qkv_bias_separate`, which would bypass a LoRA layer on `qkv`; the separate form
    `self.qkv(x) + bias` is the same function and calls the (LoRA) module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in backbone.modules():
        if getattr(module, "q_bias", None) is not None and isinstance(getattr(module, "qkv", None), BaseTunerLayer):
            module.qkv_bias_separate = True


FAMILIES = {"timm": load_timm}
