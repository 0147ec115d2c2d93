"""Classifier heads: cosine (logits = scale * cos(f, w_c), LIFT / Focal-SAM CLIP runs) and linear.

`init_head_from_text` writes normalize(normalize(text(c)) @ proj^T) into the head's weight
(docs/algorithms.md, "CLIP fine-tuning protocol"); the text embeddings come from the backbone's
text encoder, which is used once and then dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineHead(nn.Module):
    """logits = scale * <f / |f|, w_c / |w_c|>, so |logits| <= scale. `scale` is fixed (not trained).

    ``one_backward_rule = "cosine"``: the one-backward Focal-SAM step knows this forward
    (ft_focal/optim/one_backward/__init__.py) and weights the head's gradient per sample in closed form.
    """

    one_backward_rule = "cosine"

    def __init__(self, in_features: int, num_classes: int, scale: float = 25.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        # Unit-norm rows, as the text initialisation gives: the gradient through the
        # normalisation scales with 1 / |w_c|, so small random rows would train far faster
        # (and less stably) than text-initialised ones at the same learning rate.
        with torch.no_grad():
            self.weight.copy_(F.normalize(torch.randn(num_classes, in_features), dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # In the weights' precision (float32) even under autocast: with logits = 25 cos, bf16's
        # ~3 significant digits put ~0.1 of noise on every logit, and the gradient of a normalised
        # row (its part tangent to the row) is a small difference of large terms, which bf16
        # rounding swamps when the features align with the rows (class-mean / text heads).
        dtype = torch.promote_types(features.dtype, self.weight.dtype)
        with torch.autocast(features.device.type, enabled=False):
            return self.scale * F.linear(F.normalize(features.to(dtype), dim=-1),
                                         F.normalize(self.weight.to(dtype), dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def build_head(kind: str, in_features: int, num_classes: int, scale: float) -> nn.Module:
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    head = nn.Linear(in_features, num_classes)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def class_prompts(classnames: list, template: str) -> list:
    """"a photo of a {}." with underscores in class names turned into spaces."""
    return [template.format(str(name).replace("_", " ")) for name in classnames]


@torch.no_grad()
def init_head_from_text(head: nn.Module, text_weights: torch.Tensor) -> None:
    """Copy unit-norm class embeddings [C, D] (already mapped to the feature space) into the head."""
    head.weight.copy_(text_weights.to(head.weight.dtype))
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()
