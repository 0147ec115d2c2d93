"""Where a model's weights and data come from, for its model card: the Hub id of the backbone's
pretrained weights (`base_model_id`, never a guess) and the dataset's name / Hub id (`dataset_info`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

# ----------------------------------------------------------------------------- base model

# open_clip (model name, pretrained tag) -> the Hub repository of those weights. OpenAI weights
# map to OpenAI's own repositories (the same weights in transformers format); other tags fall
# back to open_clip's own `hf_hub` entry (e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K).
OPEN_CLIP_HUB = {
    ("ViT-B-32", "openai"): "openai/clip-vit-base-patch32",
    ("ViT-B-16", "openai"): "openai/clip-vit-base-patch16",
    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14",
    ("ViT-L-14-336", "openai"): "openai/clip-vit-large-patch14-336",
    ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    ("ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
}
# The file names of OpenAI's original CLIP releases (open_clip loads them from a path).
OPENAI_FILES = {
    "ViT-B-32.pt": "openai/clip-vit-base-patch32",
    "ViT-B-16.pt": "openai/clip-vit-base-patch16",
    "ViT-L-14.pt": "openai/clip-vit-large-patch14",
    "ViT-L-14-336px.pt": "openai/clip-vit-large-patch14-336",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CACHE_DIR = re.compile(r"models--([A-Za-z0-9_.-]+)--([A-Za-z0-9_.-]+)")


def _hub_id_from_path(path: str) -> Optional[str]:
    """`.../models--org--name/snapshots/<sha>/...` (the HF cache layout) -> "org/name"."""
    match = _CACHE_DIR.search(path)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not os.path.exists(text)


def _name_or_path_of(directory: Path) -> Optional[str]:
    for name in ("config.json", "open_clip_config.json"):
        cfg = directory / name
        if cfg.is_file():
            try:
                value = json.loads(cfg.read_text()).get("_name_or_path")
            except (ValueError, AttributeError, OSError):
                continue
            if isinstance(value, str) and _looks_like_hub_id(value):
                return value
    return None


def base_model_id(model_cfg: Any) -> Optional[str]:
    """The Hub id of the backbone's pretrained weights, or None when it is not known.

    open_clip: a pretrained tag -> the table above, else open_clip's `hf_hub` of the tag; a
    file / `local-dir:` -> the HF cache layout of its path, OpenAI's original file names, or a
    `_name_or_path` in the folder's config. transformers: a hub id used from the cache -> itself;
    a directory -> its config's `_name_or_path`, else the HF cache layout. Random init -> None.
    """
    pretrained = getattr(model_cfg, "pretrained", None)
    if not pretrained:
        return None
    family = getattr(model_cfg, "family", "open_clip")
    name = str(getattr(model_cfg, "name", "")).replace("/", "-")
    if family == "open_clip":
        if pretrained.startswith("local-dir:"):
            directory = Path(os.path.expanduser(pretrained[len("local-dir:"):]))
            return _hub_id_from_path(str(directory.resolve() if directory.exists() else directory)) or (
                _name_or_path_of(directory) if directory.is_dir() else None)
        path = Path(os.path.expanduser(pretrained))
        if path.exists() or "/" in pretrained or os.sep in pretrained or path.suffix:
            found = _hub_id_from_path(str(path.resolve() if path.exists() else path))
            if found:
                return found
            if path.name in OPENAI_FILES and OPENAI_FILES[path.name].endswith(_openai_suffix(name)):
                return OPENAI_FILES[path.name]
            return _name_or_path_of(path.parent) if path.is_file() else None
        tag = pretrained.lower()
        if (name, tag) in OPEN_CLIP_HUB:
            return OPEN_CLIP_HUB[(name, tag)]
        try:
            import open_clip

            cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained) or {}
        except Exception:  # noqa: BLE001 - an unknown tag simply has no known base model
            cfg = {}
        hub = str(cfg.get("hf_hub") or "").strip("/")
        return hub if _HUB_ID.match(hub) else None
    # transformers families
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        return _name_or_path_of(path) or _hub_id_from_path(str(path.resolve()))
    if _looks_like_hub_id(pretrained):
        return pretrained
    return _hub_id_from_path(pretrained)


def _openai_suffix(name: str) -> str:
    return {"ViT-B-32": "patch32", "ViT-B-16": "patch16", "ViT-L-14": "patch14",
            "ViT-L-14-336": "patch14-336"}.get(name, "\0")


# ----------------------------------------------------------------------------- dataset


def dataset_info(recipe: Any) -> tuple[str, Optional[str]]:
    """(a human-readable dataset name, its Hub dataset id or None)."""
    data = recipe.data
    kind = data.dataset
    if kind == "hf" and data.hf_path:
        hub = data.hf_path if _looks_like_hub_id(data.hf_path) or "/" not in data.hf_path and not os.path.exists(
            data.hf_path) else None
        return (data.hf_path if hub else Path(data.hf_path).name), hub
    if kind == "digits_lt":
        return "digits-LT (scikit-learn digits, long-tailed)", None
    if kind == "synthetic":
        return "synthetic (random images, tests only)", None
    if kind == "cifar_lt":
        n = data.num_classes or 10
        factor = f" IF {data.imbalance_factor:g}" if data.imbalance_factor else ""
        return f"CIFAR-{n}-LT{factor}", None
    text = " ".join(str(v) for v in (data.root, data.train_list, data.test_list, recipe.name) if v).lower()
    for pattern, label in ((r"imagenet[_-]?lt", "ImageNet-LT"), (r"(^|[^a-z])inat", "iNaturalist 2018"),
                           (r"places[_-]?lt|(^|[^a-z])places", "Places-LT")):
        if re.search(pattern, text):
            return label, None
    root = Path(str(data.root or "data")).name
    return root or kind, None
