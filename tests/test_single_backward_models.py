"""The one-backward Focal-SAM step on the toolkit's own models (cosine head, AdaptFormer with its
learnable scale, LoRA): same update as the default three-backward step, at SAM's pass count."""

import copy

import pytest
import torch

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.optim import FocalSAM

COUNTS = [100, 50, 20, 10, 5, 2]


@pytest.mark.parametrize("family,method,expected_backward", [
    ("open_clip", "adaptformer", 2), ("hf_clip", "adaptformer", 2), ("hf_clip", "lora", 2), ("hf_vit", "head", 2),
    ("open_clip", "lora", 2),  # LoRA inside nn.MultiheadAttention: applied to the activations
])
def test_single_backward_equals_default_on_real_models(family, method, expected_backward):
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(**tiny_model_config(family)), TuningConfig(method=method, lora_rank=4),
                             len(COUNTS), [f"c{i}" for i in range(len(COUNTS))]).double()
    with torch.no_grad():  # non-trivial adapters so every trainable tensor matters
        for name, p in model.named_parameters():
            if p.requires_grad and ("up" in name or "lora_B" in name):
                p.normal_(0, 0.05)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    updates = []
    for m, single in ((model, True), (twin, False)):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = FocalSAM(params, torch.optim.SGD, rho=0.05, gamma=1.0, lam=0.8, class_counts=COUNTS, lr=0.1,
                       momentum=0.9, model=m, single_backward=single)
        for _ in range(3):  # the first single-backward step is checked against the exact path
            opt.step(lambda m=m: criterion(m(x), y), targets=y)
        updates.append((params, dict(opt.last_pass_counts)))
    (fast, fast_passes), (slow, _) = updates
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert fast_passes == {"forward": 2, "backward": expected_backward}
