"""A plain `nn.Module` for other evaluators: RGB in [0, 1] in, logits out, normalisation inside.

RobustBench (`benchmark(model, dataset="imagenet", threat_model="corruptions")`), torchattacks,
AutoAttack and most evaluation scripts feed a model un-normalised images in [0, 1] and expect it
to apply its own mean / std. `PlainClassifier` wraps an ft_focal classifier that way:

    forward(x): x [B, 3, H, W] float RGB in [0, 1], H = W = `image_size` -> logits [B, C]
    logits = classifier((x - mean) / std)     (mean / std: the backbone's, per channel)

The class order is `.classnames` (index c of the logits is `classnames[c]`); the module is in
eval mode. Resizing / cropping stay the caller's job (RobustBench's ImageNet loaders give 224 px
after Resize(256) + CenterCrop(224)); a wrong size is refused with one line rather than
silently interpolated. So is input outside [0, 1] (0-255 pixels, or images normalised already),
which would give confident nonsense: values below -0.25 or above 1.25 are refused (the margin
allows the overshoot of a bicubic resize). On the CPU every batch is checked; on a GPU only the
first batch each device sees (reading its min / max is one host sync; checking every batch would
add one per call), since a pipeline that feeds 0-255 pixels does so from its first batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class PlainClassifier(nn.Module):
    """RGB [B, 3, H, W] in [0, 1] -> logits [B, C]; see the module docstring.

    classifier: module on normalised pixels (an `ImageClassifier`); preprocess: its
    {"image_size", "mean", "std"}; classnames: C names in logit order.
    """

    def __init__(self, classifier: nn.Module, preprocess: dict, classnames: Sequence[str],
                 class_counts: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.classnames = list(classnames)
        self.class_counts = None if class_counts is None else [int(c) for c in class_counts]
        self.image_size = int(preprocess["image_size"])
        # Buffers (not saved: they come from preprocess.json) so .to(device) moves them along.
        self.register_buffer("mean", torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.eval()
        self._range_checked: set = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected RGB images [B, 3, {self.image_size}, {self.image_size}] in [0, 1], "
                             f"got {list(x.shape)}")
        if x.device.type == "cpu" or x.device not in self._range_checked:
            check_unit_range(x)
            self._range_checked.add(x.device)
        return self.classifier((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, num_classes={len(self.classnames)}, input=RGB in [0, 1]"


RANGE_MARGIN = 0.25  # a bicubic resize of [0, 1] pixels overshoots by less than this


def check_unit_range(x: torch.Tensor) -> None:
    """One line (ValueError) when `x` is clearly not RGB in [0, 1] (e.g. 0-255 or normalised)."""
    if not x.is_floating_point():
        raise ValueError(f"expected float RGB images in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    low, high = float(x.min()), float(x.max())
    if low < -RANGE_MARGIN or high > 1 + RANGE_MARGIN:
        hint = " (0-255 pixels? divide by 255)" if high > 2 else " (normalised already? give raw RGB)"
        raise ValueError(f"expected RGB images in [0, 1], got values in [{low:.3g}, {high:.3g}]{hint}; "
                         "the model normalises inside")


def plain_model(saved: object) -> PlainClassifier:
    """The `PlainClassifier` of a loaded model (`ft_focal.load_model(...)` / `load_model_dir(...)`)."""
    return PlainClassifier(saved.model, saved.preprocess, saved.classnames, getattr(saved, "class_counts", None))


__all__ = ["PlainClassifier", "plain_model"]
