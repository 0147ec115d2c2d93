"""One image of an ImageNet-C-style render: checks of the requested corruptions, the seeded corruption
of one image and its JPEG file (ft_focal/data/corrupt.py renders sets of them).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Optional, Sequence, Union

import numpy as np

from ft_focal.data.imagenet_c import load_rgb
from ft_focal.errors import UserError

ImageSource = Union[str, os.PathLike, np.ndarray]


def available_corruptions() -> list[str]:
    """The corruption names the installed `imagecorruptions` provides (19 for ImageNet-C)."""
    try:
        from imagecorruptions import get_corruption_names
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError(
            "the 'imagecorruptions' module is missing; install the package 'imagecorruptions-imaug'"
        ) from None
    return list(get_corruption_names("all"))


def check_corruptions(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """UserError if a corruption name is unknown to imagecorruptions or a severity is not 1..5."""
    if isinstance(corruptions, str) or not corruptions:
        raise UserError(f"corruptions must be a non-empty list of names, got {corruptions!r}")
    valid = available_corruptions()
    bad = [c for c in corruptions if c not in valid]
    if bad:
        raise UserError(f"unknown corruption(s) {', '.join(map(str, bad))}; valid: {', '.join(valid)}")
    if len(set(corruptions)) != len(corruptions):
        raise UserError(f"corruption requested twice in {list(corruptions)}")
    if not severities:
        raise UserError("no severities requested")
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5:
            raise UserError(f"severity {s!r} is not an integer in 1..5")
    if len(set(int(s) for s in severities)) != len(severities):
        raise UserError(f"severity requested twice in {list(severities)}")


def corruption_seed(relative_out_path: str, corruption: str, severity: int) -> int:
    """A 32-bit seed from (image, corruption, severity), stable across runs and platforms."""
    key = f"{relative_out_path}|{corruption}|{int(severity)}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def prepare_image(source: ImageSource, resize: Optional[int] = 256, crop: Optional[int] = 224) -> np.ndarray:
    """Load `source` (path or uint8 array HxW / HxWx1 / HxWx3) -> RGB uint8 array after
    Resize(`resize`) (shorter side, PIL bilinear, torchvision's arithmetic) and
    CenterCrop(`crop`). `None` skips a step."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            raise UserError(f"image array has dtype {arr.dtype}; expected uint8 (0..255)")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            img = Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")
        elif arr.ndim == 3 and arr.shape[2] == 3:
            img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
        else:
            raise UserError(f"image array has shape {arr.shape}; expected HxW or HxWx3")
    else:
        img = load_rgb(os.fspath(source))
    if resize is not None:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = int(resize), int(int(resize) * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BILINEAR)
    if crop is not None:
        w, h = img.size
        if w < crop or h < crop:
            raise UserError(f"image of size {w}x{h} is smaller than the crop {crop}; set a resize >= crop")
        top = int(round((h - crop) / 2.0))
        left = int(round((w - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
    out = np.asarray(img, dtype=np.uint8)
    if out.shape[0] < 32 or out.shape[1] < 32:
        raise UserError(f"image is {out.shape[1]}x{out.shape[0]} after preprocessing; imagecorruptions needs >= 32x32")
    return out


_SEED_KW: dict[str, bool] = {}


def _takes_seed(name: str) -> bool:
    if name not in _SEED_KW:
        from imagecorruptions import corruption_dict

        _SEED_KW[name] = "seed" in inspect.signature(corruption_dict[name]).parameters
    return _SEED_KW[name]


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """`imagecorruptions.corrupt` with every random source seeded from `seed`."""
    from imagecorruptions import corrupt

    np.random.seed(seed)
    kwargs = {"seed": seed} if _takes_seed(corruption) else {}
    out = corrupt(image, corruption_name=corruption, severity=int(severity), **kwargs)
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.clip(out, 0, 255).astype(np.uint8)
    return out


def save_jpeg(arr: np.ndarray, path: str, quality: int) -> None:
    """Write a JPEG atomically (`path`.tmp, then a rename), as ImageNet-C's script saves them (optimize=True)."""
    from PIL import Image

    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        Image.fromarray(arr).save(fh, format="JPEG", quality=quality, optimize=True)
    os.replace(tmp, path)
