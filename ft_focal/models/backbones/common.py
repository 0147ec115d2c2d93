"""What every backbone family shares: the `LoadedBackbone` it returns and the preprocessing helpers.

A family is one module of this package (open_clip.py, hf.py, ...) with a `FAMILIES` mapping of
`model.family` name -> loader `(model_cfg, load_weights) -> LoadedBackbone`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF_MEAN = [0.5, 0.5, 0.5]
HALF_STD = [0.5, 0.5, 0.5]
# PIL resample codes used in transformers' preprocessor_config.json
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Reserved key in `model.config`: preprocessing of the architecture (kept with the resolved config
# so that a rebuilt model preprocesses like the original).
PREPROCESS_KEY = "preprocess_cfg"

TextEncoder = Callable[[list], torch.Tensor]


@dataclass
class LoadedBackbone:
    module: nn.Module
    feature_dim: int
    preprocess: dict
    resolved_config: dict
    text_encoder: Optional[TextEncoder] = None
    no_text_reason: str = ""
    # family specific: where the transformer blocks live and what their MLP / norm are called
    blocks: list = field(default_factory=list)
    mlp_attr: str = "mlp"
    norm_attr: str = "ln_2"


def make_preprocess(image_size, mean, std, interpolation) -> dict:
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    return {
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(interpolation),
    }


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def looks_like_path(text: str) -> bool:
    """True for things that can only be a file system path (not an open_clip tag or hub id)."""
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")
    )


def proj_map(text_emb: torch.Tensor, proj_t: torch.Tensor) -> torch.Tensor:
    """normalize(normalize(text) @ P) where P maps the text space E back to the feature space D."""
    text_emb = F.normalize(text_emb.float(), dim=-1)
    return F.normalize(text_emb @ proj_t.float(), dim=-1)


