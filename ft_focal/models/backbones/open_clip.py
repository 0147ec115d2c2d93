"""The open_clip family: an open_clip ViT (file, `local-dir:` folder, or a tag / hub id in the local HF cache).

The backbone is open_clip's `VisionTransformer` without `proj`; the text encoder maps prompts
through the text tower and proj^T into the feature space (docs/algorithms.md, head init).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ft_focal.errors import UserError, one_line
from ft_focal.models.backbones.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PREPROCESS_KEY,
    LoadedBackbone,
    deep_merge,
    looks_like_path,
    make_preprocess,
    proj_map,
)

logger = logging.getLogger(__name__)


class OpenClipBackbone(nn.Module):
    """open_clip `VisionTransformer` with `proj` removed: forward = pooled CLS after ln_post."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixel_values)
        if isinstance(out, (tuple, list)):  # output_tokens=True
            out = out[0]
        return out


def _open_clip_checkpoint_in_dir(path: Path) -> Optional[Path]:
    preferred = [
        "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
        "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
    ]
    for name in preferred:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
    return found[0] if found else None


def _instantiate_open_clip(cfg: dict):
    import open_clip

    cfg = copy.deepcopy(cfg)
    cfg.pop(PREPROCESS_KEY, None)
    text_cfg = cfg.setdefault("text_cfg", {})
    vision_cfg = cfg.setdefault("vision_cfg", {})
    if "timm_model_name" in vision_cfg:
        raise UserError(
            "model.name/model.config: open_clip timm vision towers are not supported "
            "(ft_focal needs an open_clip VisionTransformer: CLS token after ln_post)"
        )
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # never download a text tower
    if custom_text:
        model_cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP
    else:
        model_cls = open_clip.CLIP
    try:
        return model_cls(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise UserError(f"model.config: not a valid open_clip model config ({one_line(exc)})") from None


def _instantiate_open_clip_visual(cfg: dict):
    """Only the vision tower (same class and parameter names as CLIP(...).visual): for rebuilds and
    random-init models whose text tower would be thrown away unused."""
    from open_clip.model import _build_vision_tower

    vision_cfg = copy.deepcopy(cfg.get("vision_cfg", {}))
    if "timm_model_name" in vision_cfg:
        _instantiate_open_clip(cfg)  # raises the UserError
    try:
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, bool(cfg.get("quick_gelu", False)), None)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise UserError(f"model.config: not a valid open_clip model config ({one_line(exc)})") from None


def _resolve_local_dir(pretrained: str, load_weights: bool) -> tuple[dict, Optional[str], dict, Optional[str]]:
    """An open_clip model folder (``local-dir:PATH``): open_clip_config.json plus a weights file."""
    directory = Path(os.path.expanduser(pretrained[len("local-dir:"):]))
    if not directory.is_dir():
        raise UserError(f"model.pretrained: directory not found: {directory}")
    cfg_path = directory / "open_clip_config.json"
    if not cfg_path.is_file():
        raise UserError(f"model.pretrained: {cfg_path} not found (a local-dir: needs open_clip_config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = raw["model_cfg"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{cfg_path}: not a valid open_clip config ({one_line(exc)})") from None
    preprocess_over = dict(raw.get("preprocess_cfg") or {})
    found = _open_clip_checkpoint_in_dir(directory)
    if found is None and load_weights:
        raise UserError(f"model.pretrained: no weights (*.safetensors, *.bin, *.pth) in {directory}")
    checkpoint = str(found) if found is not None else None
    return cfg, checkpoint, preprocess_over, "local-dir:" + str(directory)


def _resolve_pretrained(model_cfg, cfg: dict, preprocess_over: dict, load_weights: bool) -> Optional[str]:
    """The checkpoint of a built-in architecture: a file, or an open_clip tag (``tag:NAME``).

    A tag's own settings (quick_gelu, normalisation) are written into ``cfg`` / ``preprocess_over``."""
    import open_clip

    pretrained = model_cfg.pretrained
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return str(path)
    if path.is_dir() and load_weights:
        raise UserError(
            f"model.pretrained: {pretrained} is a directory; use 'local-dir:{pretrained}' for an open_clip "
            "model folder (open_clip_config.json + weights) or give the weights file"
        )
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(model_cfg.name.replace("/", "-"), pretrained)
    if tag_cfg and not looks_like_path(pretrained) and not path.exists():
        if "quick_gelu" in tag_cfg:
            cfg["quick_gelu"] = bool(tag_cfg["quick_gelu"])
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if key in tag_cfg:
                preprocess_over[key] = tag_cfg[key]
        return "tag:" + pretrained
    if not load_weights:
        return None  # rebuilding: the file is not needed
    raise UserError(f"model.pretrained: file not found: {pretrained}")


def _resolve_named(model_cfg, load_weights: bool) -> tuple[dict, Optional[str], dict, Optional[str]]:
    """A built-in open_clip architecture (``model.name``), or a custom one from ``model.config``."""
    import open_clip

    base = open_clip.get_model_config(model_cfg.name.replace("/", "-"))
    if base is None and not model_cfg.config:
        raise UserError(
            f"model.name: '{model_cfg.name}' is not an open_clip model "
            "(see open_clip.list_models()); give model.config for a custom architecture"
        )
    cfg = copy.deepcopy(base) if base else {}
    tokenizer_source = None
    if base is not None and "text_cfg" not in (model_cfg.config or {}):
        tokenizer_source = model_cfg.name.replace("/", "-")  # the built-in model's own tokenizer
    preprocess_over: dict = {}
    checkpoint = _resolve_pretrained(model_cfg, cfg, preprocess_over, load_weights) if model_cfg.pretrained else None
    return cfg, checkpoint, preprocess_over, tokenizer_source


def _resolve_open_clip(model_cfg, load_weights: bool = True) -> tuple[dict, Optional[str], dict, Optional[str]]:
    """-> (architecture cfg, checkpoint path or None, preprocess overrides, tokenizer source).

    load_weights=False touches no weight file (a local-dir's open_clip_config.json is read only
    when model.config does not already give the architecture)."""
    pretrained = model_cfg.pretrained
    local_dir = bool(pretrained) and pretrained.startswith("local-dir:")
    if local_dir and not load_weights and model_cfg.config:
        cfg, checkpoint, preprocess_over, tokenizer_source = {}, None, {}, None
    elif local_dir:
        cfg, checkpoint, preprocess_over, tokenizer_source = _resolve_local_dir(pretrained, load_weights)
    else:
        cfg, checkpoint, preprocess_over, tokenizer_source = _resolve_named(model_cfg, load_weights)
    if model_cfg.config:
        cfg = deep_merge(cfg, model_cfg.config)
    if PREPROCESS_KEY in cfg:
        preprocess_over = {**preprocess_over, **(cfg.get(PREPROCESS_KEY) or {})}
    if "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise UserError("model.config: an open_clip config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    return cfg, checkpoint, preprocess_over, tokenizer_source


def _load_open_clip_weights(model, checkpoint: str, model_cfg) -> None:
    import open_clip

    if checkpoint.startswith("tag:"):
        tag = checkpoint[4:]
        tag_cfg = open_clip.pretrained.get_pretrained_cfg(model_cfg.name.replace("/", "-"), tag)
        try:
            checkpoint = open_clip.pretrained.download_pretrained(tag_cfg)
        except Exception as exc:  # offline, not cached
            raise UserError(
                f"model.pretrained: weights '{tag}' of {model_cfg.name} are not on disk ({one_line(exc)}); "
                "give the path of a downloaded checkpoint file"
            ) from None
        if not checkpoint:
            raise UserError(f"model.pretrained: weights '{tag}' of {model_cfg.name} are not on disk")
    try:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
                open_clip.load_checkpoint(model, checkpoint, strict=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc):
                raise
            _refuse_torchscript_checkpoint(checkpoint)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"model.pretrained: cannot load {checkpoint} into open_clip model '{model_cfg.name}' ({one_line(exc)})"
        ) from None


def _refuse_torchscript_checkpoint(checkpoint: str) -> None:
    """OpenAI's original CLIP files (e.g. ~/.cache/clip/ViT-B-16.pt) are TorchScript archives.

    Reading one means running `torch.jit.load`, which deserialises code, not just tensors; we
    load only safetensors or `torch.load(weights_only=True)` files, so we refuse it and say
    where the same weights come as safetensors.
    """
    raise UserError(
        f"model.pretrained: {checkpoint} is a TorchScript archive (OpenAI's original CLIP format), which is not "
        "loaded for safety; use the same weights as safetensors, e.g. open_clip_model.safetensors of "
        "timm/vit_base_patch16_clip_224.openai"
    )


def _encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip encode_text(normalize=True), with the padding after the longest prompt cut off.

    For the standard CLIP text tower (causal mask, pooled at the EOT token) the tokens after
    the EOT never influence it, so running only the first L positions is exact and several
    times faster than the full context (77) for short prompts."""
    import open_clip
    from open_clip.transformer import text_global_pool

    pool = getattr(model, "text_pool_type", None)
    eos_id = getattr(model, "text_eos_id", None)
    mask = getattr(model, "attn_mask", None)
    if type(model) is not open_clip.CLIP or mask is None or pool not in ("argmax", "eos") or (
        pool == "eos" and eos_id is None
    ):
        return model.encode_text(tokens, normalize=True)
    if pool == "argmax":
        last = tokens.argmax(dim=-1)
    else:
        last = (tokens == eos_id).int().argmax(dim=-1)
    length = int(last.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, pool, eos_token_id=eos_id)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)


def _open_clip_tokenizer(cfg: dict, tokenizer_source: Optional[str]):
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if tokenizer_source:
        return open_clip.get_tokenizer(tokenizer_source)
    text_cfg = cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}) or {})
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return SimpleTokenizer(context_length=context_length, **kwargs)


def _build_open_clip(model_cfg, cfg: dict, checkpoint: Optional[str], load_weights: bool):
    """-> (full model or None, vision tower); the full model only when its weights or text tower are needed."""
    needs_full_model = (load_weights and (checkpoint or model_cfg.head_init == "text")) or "multimodal_cfg" in cfg
    if not needs_full_model:
        model, visual = None, _instantiate_open_clip_visual(cfg)
    else:
        model = _instantiate_open_clip(cfg)
        visual = model.visual
    if model is not None and load_weights and checkpoint:
        if "openai" in checkpoint.lower() and not cfg.get("quick_gelu", False):
            logger.warning(
                "model.pretrained %s looks like OpenAI CLIP weights, which were trained with QuickGELU; "
                "model.name '%s' uses nn.GELU (use the '-quickgelu' model name, e.g. ViT-B-16-quickgelu)",
                checkpoint, model_cfg.name,
            )
        _load_open_clip_weights(model, checkpoint, model_cfg)
        logger.info("open_clip %s: weights loaded from %s", model_cfg.name, checkpoint)
    elif load_weights:
        logger.info("open_clip %s: random initialisation (model.pretrained is null)", model_cfg.name)
    return model, visual


def _text_encoder(model, tokenizer, proj: torch.Tensor) -> Callable[..., torch.Tensor]:
    @torch.no_grad()
    def text_encoder(prompts: list, batch_size: int = 256) -> torch.Tensor:
        model.eval()
        chunks = []
        tokens = tokenizer(list(prompts))
        order = torch.argsort((tokens != 0).sum(dim=-1))  # similar lengths share a batch
        for i in range(0, len(prompts), batch_size):
            chunks.append(_encode_text(model, tokens[order[i:i + batch_size]]).float())
        emb = torch.empty(len(prompts), chunks[0].shape[-1])
        emb[order] = torch.cat(chunks)
        return proj_map(emb, proj.t())

    return text_encoder


def _open_clip_text_encoder(model, proj: Optional[torch.Tensor], cfg: dict, tokenizer_source: Optional[str],
                            load_weights: bool) -> tuple[Optional[Callable[..., torch.Tensor]], str]:
    """-> (prompt encoder into the image feature space, or None and the reason why there is none)."""
    if not load_weights:
        return None, "rebuilding without weights"
    if model is None:
        return None, "head_init is not 'text'"
    if proj is None:
        return None, "the vision tower has no projection"
    if not hasattr(model, "encode_text"):
        return None, "the model has no text tower"
    try:
        tokenizer = _open_clip_tokenizer(cfg, tokenizer_source)
    except Exception as exc:
        return None, f"cannot load the open_clip tokenizer ({one_line(exc)})"
    return _text_encoder(model, tokenizer, proj), ""


def _open_clip_preprocess(cfg: dict, visual, preprocess_over: dict) -> tuple[dict, dict]:
    """-> (test-time preprocessing, architecture cfg that records it)."""
    preprocess = make_preprocess(
        preprocess_over.get("size", visual.image_size),
        preprocess_over.get("mean", OPENAI_CLIP_MEAN),
        preprocess_over.get("std", OPENAI_CLIP_STD),
        preprocess_over.get("interpolation", "bicubic"),
    )
    resolved = copy.deepcopy(cfg)
    resolved[PREPROCESS_KEY] = {
        "size": preprocess["image_size"], "mean": preprocess["mean"], "std": preprocess["std"],
        "interpolation": preprocess["interpolation"],
    }
    return preprocess, resolved


def load_open_clip(model_cfg, load_weights: bool) -> LoadedBackbone:
    cfg, checkpoint, preprocess_over, tokenizer_source = _resolve_open_clip(model_cfg, load_weights)
    model, visual = _build_open_clip(model_cfg, cfg, checkpoint, load_weights)
    if not hasattr(visual, "ln_post") or not hasattr(visual, "transformer"):
        raise UserError(
            f"model.name: open_clip model '{model_cfg.name}' has no ViT vision tower (ln_post); "
            "only open_clip VisionTransformer towers are supported"
        )
    feature_dim = int(visual.ln_post.normalized_shape[0])
    proj = visual.proj.detach().clone() if getattr(visual, "proj", None) is not None else None
    text_encoder, reason = _open_clip_text_encoder(model, proj, cfg, tokenizer_source, load_weights)
    visual.proj = None  # features are taken before the projection; it is not part of the classifier
    preprocess, resolved = _open_clip_preprocess(cfg, visual, preprocess_over)
    return LoadedBackbone(
        module=OpenClipBackbone(visual),
        feature_dim=feature_dim,
        preprocess=preprocess,
        resolved_config=resolved,
        text_encoder=text_encoder,
        no_text_reason=reason,
        blocks=list(visual.transformer.resblocks),
        mlp_attr="mlp",
        norm_attr="ln_2",
    )


FAMILIES = {"open_clip": load_open_clip}
