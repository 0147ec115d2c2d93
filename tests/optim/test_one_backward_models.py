"""The one-backward Focal-SAM step on the toolkit's own models (cosine head, AdaptFormer with its
learnable scale, LoRA): same update as the default three-backward step, at SAM's pass count."""

import copy

import pytest
import torch

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.optim import FocalSAM, ImbSAM

COUNTS = [100, 50, 20, 10, 5, 2]


@pytest.mark.parametrize("family,method,expected_backward", [
    ("open_clip", "adaptformer", 2), ("hf_clip", "adaptformer", 2), ("hf_clip", "lora", 2), ("hf_vit", "head", 2),
    ("open_clip", "lora", 2),  # LoRA inside nn.MultiheadAttention: applied to the activations
    # full tuning: class / positional embeddings have no rule and MultiheadAttention uses its
    # in-projection functionally: the exact three-backward step, same update
    ("open_clip", "full", 3),
])
def test_one_backward_equals_default_on_real_models(family, method, expected_backward):
    assert_one_backward_matches_exact(_tiny(family, method, torch.float64), expected_backward)


def adapters_away_from_zero_(model):
    """Non-trivial adapters (their up / lora_B start at zero), so every trainable tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("up" in name or "lora_B" in name):
                p.normal_(0, 0.05)
    return model


def assert_one_backward_matches_exact(model, backward):
    """Three one-backward Focal-SAM steps (float64) give the default three-backward path's update to
    1e-9, in 2F + ``backward``B (2: split; 3: fell back to the exact path)."""
    adapters_away_from_zero_(model)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    runs = []
    for m, single in ((model, True), (twin, False)):
        params = [p for p in m.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        opt = FocalSAM(params, torch.optim.SGD, rho=0.05, gamma=1.0, lam=0.8, class_counts=COUNTS, lr=0.1,
                       momentum=0.9, model=m, one_backward=single)
        for _ in range(3):  # the first one-backward step is checked against the exact path
            opt.step(lambda m=m: criterion(m(x), y), targets=y)
        runs.append(([p.detach() - s for p, s in zip(params, start, strict=True)], dict(opt.last_pass_counts)))
    (fast, fast_passes), (slow, slow_passes) = runs
    assert max(float(d.abs().max()) for d in slow) > 1e-4
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert fast_passes == {"forward": 2, "backward": backward} and slow_passes["backward"] == 3


def _tiny(family, method, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(**tiny_model_config(family)), TuningConfig(method=method, lora_rank=4),
                             len(COUNTS), [f"c{i}" for i in range(len(COUNTS))]).to(dtype)
    return adapters_away_from_zero_(model)


FOCAL = dict(rho=0.05, gamma=1.0, lam=0.8, momentum=0.9)


def _run(model, single, steps=3, autocast=None, scaler=None, compile_backend=None, cls=FocalSAM, seed=1,
         **settings):
    """Steps of `cls` (default Focal-SAM with FOCAL settings) on a fixed batch; returns (update of
    each trainable tensor, last pass counts, optimizer)."""
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5])
    if compile_backend:
        torch._dynamo.reset()   # dynamo ignores hooks added after a compile: start clean, as the loop does
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cls(params, torch.optim.SGD, class_counts=COUNTS, lr=0.1, model=model, one_backward=single,
              scaler=scaler, **(settings or FOCAL))

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            logits = forward(x)
        return torch.nn.functional.cross_entropy(logits.to(dtype), y, reduction="none")  # bf16 -> model dtype

    start = [p.detach().clone() for p in params]
    for _ in range(steps):
        opt.step(closure, targets=y)
    return [p.detach() - s for p, s in zip(params, start, strict=True)], dict(opt.last_pass_counts), opt


@pytest.mark.parametrize("family,method", [("open_clip", "lora"), ("open_clip", "adaptformer"), ("hf_clip", "lora")])
def test_one_backward_under_bf16_autocast(family, method):
    """Mixed precision: the hook gradients come from bf16 activations, like autograd's own; the
    update matches the default path to bf16 rounding (relative to the update's size)."""
    model = _tiny(family, method)
    twin = copy.deepcopy(model)
    fast, passes, opt = _run(model, True, autocast=torch.bfloat16)
    slow, _, _ = _run(twin, False, autocast=torch.bfloat16)
    assert opt.one_backward.disabled is None and passes == {"forward": 2, "backward": 2}
    scale = max(float(d.abs().max()) for d in slow)
    worst = max(float((a - b).abs().max()) for a, b in zip(fast, slow, strict=True))
    assert scale > 1e-4 and worst <= 0.05 * scale


@pytest.mark.parametrize("family,method", [("open_clip", "lora"), ("open_clip", "adaptformer")])
def test_one_backward_with_grad_scaler(family, method):
    """fp16-style loss scaling: the hook part is unscaled like every other gradient; same update."""
    model = _tiny(family, method)
    twin = copy.deepcopy(model)
    updates, passes = [], []
    for m, single in ((model, True), (twin, False)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        delta, counts, opt = _run(m, single, scaler=scaler)
        updates.append(delta)
        passes.append(counts["backward"])
        assert opt.skipped_steps == 0
    assert passes == [2, 3]
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,method", [
    ("open_clip", "lora"), pytest.param("hf_clip", "adaptformer", marks=pytest.mark.slow)])
def test_one_backward_under_torch_compile(family, method):
    """torch.compile (dynamo + AOT autograd, no C++ toolchain needed): the hooks still see every
    layer (dynamo breaks the graph around the hooked calls), the update is the default path's."""
    model = _tiny(family, method)
    twin = copy.deepcopy(model)
    fast, passes, opt = _run(model, True, compile_backend="aot_eager")
    slow, _, _ = _run(twin, False)
    assert opt.one_backward.disabled is None and passes == {"forward": 2, "backward": 2}
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,settings", [
    ("focal_sam", dict(gamma=0.0, lam=1.0)),    # = SAM
    ("focal_sam", dict(gamma=2.0, lam=0.3)),
    ("focal_sam", dict(gamma=0.5, lam=0.95)),
    ("imbsam", dict(tail_threshold=15, tail_weight=1.0)),
    ("imbsam", dict(tail_threshold=15, tail_weight=2.0)),   # the official x2
])
def test_one_backward_settings_on_open_clip_lora(method, settings):
    """Several gamma / lam (Focal-SAM) and tail weights (ImbSAM): one backward, default update."""
    model = _tiny("open_clip", "lora", torch.float64)
    twin = copy.deepcopy(model)
    cls = FocalSAM if method == "focal_sam" else ImbSAM
    runs = [_run(m, single, cls=cls, seed=2, rho=0.1, **settings) for m, single in ((model, True), (twin, False))]
    updates = [delta for delta, _, _ in runs]
    assert [counts["backward"] for _, counts, _ in runs] == [2, 3]
    assert max(float(d.abs().max()) for d in updates[1]) > 1e-4
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
