"""The transformers families: `hf_clip` (CLIPVisionModel, with CLIPModel's text tower when present) and
`hf_vit` (ViTModel), from a `save_pretrained` directory or a hub id in the local HF cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ft_focal.errors import UserError, one_line
from ft_focal.models.backbones.common import (
    HALF_MEAN,
    HALF_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PIL_RESAMPLE,
    PREPROCESS_KEY,
    LoadedBackbone,
    looks_like_path,
    make_preprocess,
    proj_map,
)

logger = logging.getLogger(__name__)


class HFBackbone(nn.Module):
    """transformers CLIPVisionModel (pooler_output = post_layernorm(CLS)) or ViTModel (CLS of the
    final-layernormed sequence)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.kind == "clip":
            return out.pooler_output
        return out.last_hidden_state[:, 0]


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        return lambda: hf_logging.set_verbosity(level)
    except Exception:  # pragma: no cover
        return lambda: None


def _hf_source(pretrained: str) -> str:
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.pretrained: {path / 'config.json'} not found (not a transformers model directory)")
        return str(path)
    if path.exists():
        raise UserError(f"model.pretrained: {pretrained} is a file; transformers families need a model directory")
    if looks_like_path(pretrained) or pretrained.count("/") != 1:
        raise UserError(f"model.pretrained: directory not found: {pretrained}")
    return pretrained  # a hub id: only usable from the local HF cache (no download here)


def _hf_preprocess_file(source: str) -> dict:
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({one_line(exc)})") from None


def _hf_preprocess(raw: dict, image_size: int, mean, std, interpolation) -> dict:
    size = raw.get("crop_size") if raw.get("do_center_crop", True) and raw.get("crop_size") else raw.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or image_size
    if size is None:
        size = image_size
    resample = raw.get("resample")
    if isinstance(resample, int):
        interpolation = PIL_RESAMPLE.get(resample, interpolation)
    return make_preprocess(size, raw.get("image_mean", mean), raw.get("image_std", std), interpolation)


def _split_preprocess(config: Optional[dict]) -> tuple[dict, dict]:
    config = dict(config or {})
    pre = config.pop(PREPROCESS_KEY, None) or {}
    return config, pre


def _apply_pre_override(pre: dict, base: dict) -> dict:
    if not pre:
        return base
    return make_preprocess(
        pre.get("size", pre.get("image_size", base["image_size"])),
        pre.get("mean", base["mean"]),
        pre.get("std", base["std"]),
        pre.get("interpolation", base["interpolation"]),
    )


def load_hf_clip(model_cfg, load_weights: bool) -> LoadedBackbone:
    from transformers import AutoConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    overrides, pre = _split_preprocess(model_cfg.config)
    text_encoder = None
    reason = ""
    restore = _quiet_transformers()
    try:
        if model_cfg.pretrained:
            source = _hf_source(model_cfg.pretrained)
            try:
                full_cfg = AutoConfig.from_pretrained(source)
            except Exception as exc:
                raise UserError(f"model.pretrained: cannot read the config of {source} ({one_line(exc)})") from None
            is_full_clip = getattr(full_cfg, "model_type", "") == "clip"
            if not load_weights:
                vcfg = CLIPVisionConfig.from_pretrained(source, **overrides)
                vision = CLIPVisionModel(vcfg)
            elif is_full_clip and model_cfg.head_init == "text":
                try:
                    clip, info = CLIPModel.from_pretrained(source, output_loading_info=True)
                except Exception as exc:
                    raise UserError(f"model.pretrained: cannot load CLIPModel from {source} ({one_line(exc)})") from None
                _warn_missing(info, source)
                vision = clip.vision_model
                text_encoder, reason = _hf_clip_text_encoder(clip, source)
            else:
                try:
                    vision, info = CLIPVisionModel.from_pretrained(source, output_loading_info=True, **overrides)
                except Exception as exc:
                    raise UserError(
                        f"model.pretrained: cannot load CLIPVisionModel from {source} ({one_line(exc)})"
                    ) from None
                _warn_missing(info, source)
                reason = "the checkpoint has no text tower" if not is_full_clip else "head_init is not 'text'"
            raw_pre = _hf_preprocess_file(source)
        else:
            overrides.pop("model_type", None)
            try:
                vcfg = CLIPVisionConfig(**overrides)
            except Exception as exc:
                raise UserError(f"model.config: not a valid CLIPVisionConfig ({one_line(exc)})") from None
            vision = CLIPVisionModel(vcfg)
            raw_pre = {}
            reason = "a CLIPVisionModel built from a config has no text tower"
    finally:
        restore()
    if not load_weights:
        reason = "rebuilding without weights"
    vcfg = vision.config
    preprocess = _apply_pre_override(
        pre, _hf_preprocess(raw_pre, vcfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
    )
    resolved = _hf_resolved(vcfg, preprocess)
    return LoadedBackbone(
        module=HFBackbone(vision, "clip"),
        feature_dim=int(vcfg.hidden_size),
        preprocess=preprocess,
        resolved_config=resolved,
        text_encoder=text_encoder,
        no_text_reason=reason,
        blocks=list(vision.encoder.layers),
        mlp_attr="mlp",
        norm_attr="layer_norm2",
    )


def _hf_clip_text_encoder(clip, source: str):
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        return None, f"no tokenizer in {source} ({one_line(exc)})"
    text_model = clip.text_model
    text_projection = clip.text_projection
    proj_t = clip.visual_projection.weight.detach().clone()  # [E, D]: maps D -> E; its transpose^T = itself
    max_len = int(getattr(clip.config.text_config, "max_position_embeddings", 77))

    @torch.no_grad()
    def text_encoder(prompts: list, batch_size: int = 256) -> torch.Tensor:
        text_model.eval()
        chunks = []
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                              return_tensors="pt")
            out = text_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            chunks.append(text_projection(out.pooler_output).float())
        # visual_projection.weight is [E, D]; text [N, E] @ [E, D] = text @ proj^T with proj = weight^T
        return proj_map(torch.cat(chunks), proj_t)

    return text_encoder, ""


def _warn_missing(info: dict, source: str) -> None:
    missing = [k for k in (info or {}).get("missing_keys", []) if "position_ids" not in k]
    if missing:
        logger.warning("%s: %d vision weights missing from the checkpoint (randomly initialised), e.g. %s",
                       source, len(missing), missing[0])


def _hf_resolved(config, preprocess: dict) -> dict:
    resolved = config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        resolved.pop(key, None)
    resolved[PREPROCESS_KEY] = {
        "size": preprocess["image_size"], "mean": preprocess["mean"], "std": preprocess["std"],
        "interpolation": preprocess["interpolation"],
    }
    return resolved


def load_hf_vit(model_cfg, load_weights: bool) -> LoadedBackbone:
    from transformers import ViTConfig, ViTModel

    overrides, pre = _split_preprocess(model_cfg.config)
    restore = _quiet_transformers()
    try:
        if model_cfg.pretrained:
            source = _hf_source(model_cfg.pretrained)
            if load_weights:
                try:
                    vit, info = ViTModel.from_pretrained(
                        source, add_pooling_layer=False, output_loading_info=True, **overrides
                    )
                except Exception as exc:
                    raise UserError(f"model.pretrained: cannot load ViTModel from {source} ({one_line(exc)})") from None
                _warn_missing(info, source)
            else:
                vit = ViTModel(ViTConfig.from_pretrained(source, **overrides), add_pooling_layer=False)
            raw_pre = _hf_preprocess_file(source)
        else:
            overrides.pop("model_type", None)
            try:
                vcfg = ViTConfig(**overrides)
            except Exception as exc:
                raise UserError(f"model.config: not a valid ViTConfig ({one_line(exc)})") from None
            vit = ViTModel(vcfg, add_pooling_layer=False)
            raw_pre = {}
    finally:
        restore()
    vcfg = vit.config
    preprocess = _apply_pre_override(pre, _hf_preprocess(raw_pre, vcfg.image_size, HALF_MEAN, HALF_STD, "bilinear"))
    return LoadedBackbone(
        module=HFBackbone(vit, "vit"),
        feature_dim=int(vcfg.hidden_size),
        preprocess=preprocess,
        resolved_config=_hf_resolved(vcfg, preprocess),
        text_encoder=None,
        no_text_reason="a ViT has no text tower",
        blocks=list(vit.layers),
        mlp_attr="mlp",
        norm_attr="layernorm_after",
    )



FAMILIES = {"hf_clip": load_hf_clip, "hf_vit": load_hf_vit}
