"""Every image transform of ft_focal: the CLIP fine-tuning protocol (LIFT / Focal-SAM,
docs/algorithms.md) and the evaluation transforms of the suites and ImageNet-C.

`preprocess` comes from the model: {"image_size": int, "mean": [3], "std": [3],
"interpolation": "bicubic"}.

* train: RandomResizedCrop(image_size, scale=data.train_crop_scale, interpolation)
  + RandomHorizontalFlip (if data.hflip) + ToTensor + Normalize(mean, std).
* test:  Resize(R) + CenterCrop(image_size) + ToTensor + Normalize(mean, std).
* five-crop (LIFT's optional test-time ensemble): Resize(R5) + FiveCrop(image_size), each crop
  ToTensor + Normalize, stacked to a tensor [5, 3, H, W] (the evaluation averages the logits).

`data.test_resize` (and LIFT's 248 for five-crop) are stated for a 224 crop, as in the
papers. For another image size the same crop ratio is kept: R = round(test_resize *
image_size / 224) (e.g. image_size 336 with test_resize 256 -> Resize(384)); at 224 it is
exactly `data.test_resize`. Resize(R) resizes the SHORTER side to R.

`build_eval_transform` is the test transform of an evaluation suite or of ImageNet-C
(explicit resize / crop / mean / std); `describe_transform` says any of them in words.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ft_focal.errors import UserError

REFERENCE_CROP = 224
FIVE_CROP_RESIZE = 248  # LIFT: Resize(248) + FiveCrop(224)

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def _preprocess_values(preprocess: dict, data_cfg=None) -> tuple[int, list, list, InterpolationMode]:
    if not isinstance(preprocess, dict):
        raise TypeError("preprocess must be a dict with image_size, mean, std, interpolation")
    size = preprocess.get("image_size", getattr(data_cfg, "image_size", REFERENCE_CROP))
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    size = int(size)
    mean = [float(x) for x in preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))]
    std = [float(x) for x in preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))]
    name = str(preprocess.get("interpolation", "bicubic")).lower()
    if name not in _INTERPOLATION:
        raise UserError(f"image interpolation {name!r} is not one of {', '.join(_INTERPOLATION)}")
    return size, mean, std, _INTERPOLATION[name]


def scaled_resize(resize: int, image_size: int) -> int:
    """The resize for `image_size` keeping the ratio `resize` : 224 (identity at 224)."""
    if image_size == REFERENCE_CROP:
        return int(resize)
    return max(int(image_size), int(round(resize * image_size / REFERENCE_CROP)))


def build_transform(preprocess: dict, data_cfg, train: bool):
    """The training or test transform (PIL RGB image -> float tensor [3, H, W])."""
    size, mean, std, interp = _preprocess_values(preprocess, data_cfg)
    normalize = T.Normalize(mean=mean, std=std)
    if train:
        scale = tuple(float(s) for s in getattr(data_cfg, "train_crop_scale", (0.08, 1.0)))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(f"data.train_crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
        steps = [T.RandomResizedCrop(size, scale=scale, interpolation=interp)]
        if getattr(data_cfg, "hflip", True):
            steps.append(T.RandomHorizontalFlip())
        return T.Compose(steps + [T.ToTensor(), normalize])
    resize = scaled_resize(getattr(data_cfg, "test_resize", REFERENCE_CROP), size)
    if resize < size:
        resize = size
    return T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size), T.ToTensor(), normalize])


class StackCrops:
    """FiveCrop output (PIL crops) -> tensor [n, 3, H, W]: `per_crop` (e.g. ToTensor + Normalize) on each
    crop, stacked (picklable, for DataLoader workers)."""

    def __init__(self, per_crop: Callable):
        self.per_crop = per_crop

    def __call__(self, crops):
        return torch.stack([self.per_crop(c) for c in crops])

    def __repr__(self) -> str:
        return f"StackCrops({self.per_crop!r})"


# PIL resample codes, as transformers' image processors record them
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def preprocessor_config(preprocess: dict, data_cfg: Any) -> dict:
    """transformers-style image processor config of the test transform (Resize + CenterCrop + Normalize).

    Kept beside `build_transform` so the exported description follows the transform it mirrors.
    """
    size = int(preprocess.get("image_size", getattr(data_cfg, "image_size", 224)))
    resize = max(size, scaled_resize(getattr(data_cfg, "test_resize", 224), size))
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize},
        "resample": _PIL_RESAMPLE.get(str(preprocess.get("interpolation", "bicubic")).lower(), 3),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.get("mean", [])),
        "image_std": list(preprocess.get("std", [])),
    }


def describe_test_transform(preprocess: dict, data_cfg: Any) -> str:
    """The test transform in words (the one `build_transform(train=False)` builds)."""
    cfg = preprocessor_config(preprocess, data_cfg)
    return (f"Resize({cfg['size']['shortest_edge']}, {preprocess.get('interpolation', 'bicubic')}) + "
            f"CenterCrop({cfg['crop_size']['height']}) + Normalize(mean {cfg['image_mean']}, std {cfg['image_std']})")


def build_five_crop_transform(preprocess: dict, data_cfg=None):
    """LIFT's test-time ensemble: Resize(248 for 224) + FiveCrop(image_size) -> [5, 3, H, W]."""
    size, mean, std, interp = _preprocess_values(preprocess, data_cfg)
    resize = scaled_resize(FIVE_CROP_RESIZE, size)
    per_crop = T.Compose([T.ToTensor(), T.Normalize(mean=mean, std=std)])
    return T.Compose([T.Resize(resize, interpolation=interp), T.FiveCrop(size), StackCrops(per_crop)])



# ----------------------------------------------------------------------------- evaluation suites / ImageNet-C

EVAL_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


def build_eval_transform(
    resize: Optional[int] = None,
    crop: Optional[int] = REFERENCE_CROP,
    interpolation: str = "bicubic",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    five_crop: bool = False,
    five_crop_resize: int = FIVE_CROP_RESIZE,
) -> Callable:
    """Test-time transform: [Resize(resize)] + [CenterCrop(crop)] + ToTensor + [Normalize].

    five_crop=True: Resize(five_crop_resize) + FiveCrop(crop), giving [5, 3, crop, crop] per
    image (LIFT's test-time ensemble; `evaluate_corruptions` averages the crops' logits).
    """
    if interpolation not in EVAL_INTERPOLATIONS:
        raise UserError(f"interpolation {interpolation!r} is not one of {', '.join(EVAL_INTERPOLATIONS)}")
    mode = getattr(T.InterpolationMode, interpolation.upper())
    to_tensor: list = [T.ToTensor()]
    if (mean is None) != (std is None):
        raise UserError("give both mean and std, or neither")
    if mean is not None:
        to_tensor.append(T.Normalize(list(mean), list(std)))
    if five_crop:
        if crop is None:
            raise UserError("five_crop needs a crop size")
        return T.Compose([T.Resize(five_crop_resize, interpolation=mode), T.FiveCrop(crop), StackCrops(T.Compose(to_tensor))])
    steps: list = []
    if resize is not None:
        steps.append(T.Resize(resize, interpolation=mode))
    if crop is not None:
        steps.append(T.CenterCrop(crop))
    return T.Compose(steps + to_tensor)


def _fmt_seq(v: Any) -> str:
    try:
        return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"
    except TypeError:
        return str(v)


def _square(size: Any) -> Any:
    return size[0] if len(size) == 2 and size[0] == size[1] else size


def describe_transform(transform: Optional[Callable]) -> str:
    """Human-readable one-liner for a torchvision transform pipeline (falls back to repr)."""
    if transform is None:
        return "PIL decode -> RGB, no transform"

    def one(t: Any) -> str:
        if isinstance(t, T.Compose):
            return " + ".join(one(x) for x in t.transforms)
        if isinstance(t, T.Resize):
            interp = getattr(t.interpolation, "value", t.interpolation)
            return f"Resize({t.size}, {interp})"
        if isinstance(t, T.CenterCrop):
            return f"CenterCrop({_square(t.size)})"
        if isinstance(t, T.FiveCrop):
            return f"FiveCrop({_square(t.size)}, logits averaged)"
        if isinstance(t, T.ToTensor):
            return "ToTensor([0,1])"
        if isinstance(t, T.Normalize):
            return f"Normalize(mean={_fmt_seq(t.mean)}, std={_fmt_seq(t.std)})"
        if isinstance(t, StackCrops):
            return one(t.per_crop) + " per crop"
        return repr(t).replace("\n", " ")

    return "PIL decode -> RGB -> " + one(transform)
