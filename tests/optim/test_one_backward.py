"""one_backward=True: the exact Focal-SAM / ImbSAM / SSE-SAM update from one backward at w, on small
reference networks and on the toolkit's own models (cosine head, AdaptFormer with its learnable scale,
LoRA): the same update as the default three-backward step, at SAM's pass count."""
import copy
import logging
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ft_focal.config import ModelConfig, TuningConfig
from ft_focal.models import build_classifier, tiny_model_config
from ft_focal.optim import FocalSAM, ImbSAM

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import max_diff, mlp, weights  # noqa: E402 (after the sys.path entry it needs)

from ft_focal.optim import SSESAM  # noqa: E402 (after the sys.path entry it needs)

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
COUNTS = [100, 30, 8, 3]
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 0, 1, 2, 0])

METHODS = {
    "focal_sam": lambda ps, **kw: FocalSAM(ps, torch.optim.SGD, rho=0.1, gamma=1.5, lam=0.8,
                                           class_counts=COUNTS, **SGD, **kw),
    "imbsam": lambda ps, **kw: ImbSAM(ps, torch.optim.SGD, rho=0.1, class_counts=COUNTS, tail_weight=2.0,
                                      **SGD, **kw),
    "sse_sam": lambda ps, **kw: SSESAM(ps, torch.optim.SGD, rho_head=0.05, rho_tail=0.2, class_counts=COUNTS,
                                       tail_threshold=40, **SGD, **kw),
}


class Tokens(nn.Module):
    """Linear layers on token tensors [B, T, D] (batch_first) or [T, B, D]."""

    def __init__(self, d=6, h=8, c=4, batch_first=True, layer_norm=False, scalar=False, functional=False):
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.mid, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)
        self.ln = nn.LayerNorm(h) if layer_norm else None
        self.s = nn.Parameter(torch.tensor(0.7)) if scalar else None
        self.functional = functional

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.ln is not None:
            h = self.ln(h)
        # `functional`: the weight is used without calling the layer (like MultiheadAttention.out_proj)
        h2 = F.linear(h, self.mid.weight, self.mid.bias) if self.functional else self.mid(h)
        if self.s is not None:
            h2 = h2 * self.s
        h = h + torch.tanh(h2)
        return self.head(h.mean(1 if self.batch_first else 0))


def tokens(seed, T, B=12, d=6, batch_first=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1).contiguous()


def compare(build, x, y=LABELS, method="focal_sam", steps=2, params=None, **kw):
    """Run the default and the one-backward path from the same start; return (diff, opts, models)."""
    models, opts = [], []
    for sb in (False, True):
        m = build()
        ps = params(m) if params else [p for p in m.parameters() if p.requires_grad]
        opt = METHODS[method](ps, one_backward=sb, model=m, **kw)
        torch.manual_seed(123)   # same dropout masks in both runs
        for _ in range(steps):
            opt.step(lambda m=m: F.cross_entropy(m(x), y, reduction="none"), targets=y)
        models.append(m)
        opts.append(opt)
    return max_diff(models[1], weights(models[0])), opts, models


@pytest.mark.parametrize("method", list(METHODS))
def test_mlp_exact_and_cheaper(method):
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    diff, (ref, sb), (m_ref, _) = compare(lambda: mlp(0), x, method=method, steps=3)
    assert diff < 1e-10 and max_diff(m_ref, weights(mlp(0))) > 1e-3
    assert sb.one_backward.validated and sb.one_backward.disabled is None
    assert ref.last_pass_counts["backward"] == sb.last_pass_counts["backward"] + 1
    assert ref.last_pass_counts["forward"] == sb.last_pass_counts["forward"]


def test_pass_counts_focal():
    x = torch.randn(12, 5, dtype=torch.float64)
    m = mlp(0)
    opt = METHODS["focal_sam"](m.parameters(), one_backward=True, model=m)
    cl = lambda: F.cross_entropy(m(x), LABELS, reduction="none")  # noqa: E731 (a one-line closure reads better than a def here)
    opt.step(cl, targets=LABELS)
    assert opt.last_pass_counts == {"forward": 2, "backward": 3}   # first step: checked against the exact path
    opt.step(cl, targets=LABELS)
    assert opt.last_pass_counts == {"forward": 2, "backward": 2}   # 2F + 2B, like SAM
    m = mlp(0)
    opt = METHODS["focal_sam"](m.parameters(), one_backward=True, one_backward_check=False, model=m)
    opt.step(cl, targets=LABELS)
    assert opt.last_pass_counts == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["focal_sam", "imbsam"])
def test_token_layouts(batch_first, method):
    x = tokens(2, T=5, batch_first=batch_first)
    diff, (_, sb), _ = compare(lambda: _seeded(Tokens, batch_first=batch_first), x, method=method)
    assert diff < 1e-10 and sb.one_backward.disabled is None and sb.last_pass_counts["backward"] == 2


def test_ambiguous_batch_dim_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = tokens(3, T=12, batch_first=False)   # [T, B, D] with T == B: no way to tell
    diff, (_, sb), _ = compare(lambda: _seeded(Tokens, batch_first=False), x)
    assert diff < 1e-10
    assert sb.one_backward.disabled and "batch dimension" in caplog.text


def test_batch_dim_remembered_when_ambiguous_later():
    m = _seeded(Tokens, batch_first=False)
    opt = METHODS["focal_sam"](m.parameters(), one_backward=True, model=m)
    x1, x2 = tokens(4, T=5, batch_first=False), tokens(5, T=12, batch_first=False)
    for x in (x1, x2, x2):
        opt.step(lambda x=x: F.cross_entropy(m(x), LABELS, reduction="none"), targets=LABELS)
    assert opt.one_backward.disabled is None and opt.last_pass_counts["backward"] == 2


def test_head_only():
    def build():
        m = mlp(0, bn=True)
        m.eval()   # frozen BatchNorm in eval mode is fine
        for p in list(m[0].parameters()) + list(m[1].parameters()):
            p.requires_grad_(False)
        return m
    x = torch.randn(12, 5, dtype=torch.float64)
    diff, (_, sb), _ = compare(build, x, params=lambda m: m[3].parameters())
    assert diff < 1e-10 and sb.one_backward.disabled is None and sb.last_pass_counts["backward"] == 2


def test_layer_norm_covered():
    x = tokens(6, T=3)
    diff, (_, sb), _ = compare(lambda: _seeded(Tokens, layer_norm=True), x, steps=3)
    assert diff < 1e-10 and sb.one_backward.disabled is None and sb.last_pass_counts == {"forward": 2, "backward": 2}


class Adapter(nn.Module):
    """AdaptFormer branch s * up(dropout(relu(down(x)))) with a learnable scale s, declaring the
    "scale" rule (forward = scale * unscaled(x))."""

    one_backward_rule = "scale"

    def __init__(self, d, r=3, p=0.2):
        super().__init__()
        self.down, self.up, self.drop = nn.Linear(d, r), nn.Linear(r, d), nn.Dropout(p)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def unscaled(self, x):
        return self.up(self.drop(F.relu(self.down(x))))

    def forward(self, x):
        return self.scale * self.unscaled(x)


class AdaptNet(nn.Module):
    def __init__(self, d=6, h=24, c=4):
        super().__init__()
        self.inp, self.mlp, self.ln = nn.Linear(d, h), nn.Linear(h, 8 * h), nn.LayerNorm(h)
        self.proj = nn.Linear(8 * h, h)
        self.adapter, self.head = Adapter(h), nn.Linear(h, c)
        for p in (*self.inp.parameters(), *self.mlp.parameters(), *self.proj.parameters()):
            p.requires_grad_(False)

    def forward(self, x):   # [B, T, D]
        h = torch.tanh(self.inp(x))
        z = self.ln(h)
        h = h + self.proj(torch.tanh(self.mlp(z))) + self.adapter(z)
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["focal_sam", "imbsam"])
def test_adapter_with_learnable_scale_and_dropout(method):
    x = tokens(10, T=4)
    diff, (_, sb), (m_ref, _) = compare(lambda: _seeded(AdaptNet), x, method=method, steps=3)
    assert diff < 1e-10 and max_diff(m_ref, weights(_seeded(AdaptNet))) > 1e-4
    assert sb.one_backward.disabled is None and sb.last_pass_counts == {"forward": 2, "backward": 2}


def test_adapter_with_a_per_channel_scale_falls_back(caplog):
    """The scale rule sums delta * u over every non-batch dim: a vector scale takes the exact path."""
    caplog.set_level(logging.WARNING, logger="ft_focal")

    def build():
        m = _seeded(AdaptNet)
        m.adapter.scale = nn.Parameter(torch.linspace(0.5, 1.5, 24, dtype=torch.float64))
        return m
    diff, (_, sb), _ = compare(build, tokens(10, T=4), steps=2)
    assert diff < 1e-12 and "one-element learnable scale" in caplog.text
    assert sb.last_pass_counts == {"forward": 2, "backward": 3}


def test_parameter_without_rule_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = tokens(6, T=3)   # the scalar s belongs to the whole model, whose forward no rule describes
    diff, (_, sb), _ = compare(lambda: _seeded(Tokens, scalar=True), x)
    assert diff < 1e-12
    assert "parameter s belongs to Tokens, which has no one-backward rule" in caplog.text
    assert caplog.text.count("one_backward:") == 1   # logged once, not every step
    assert sb.last_pass_counts == {"forward": 2, "backward": 3}


class MHANet(nn.Module):
    def __init__(self, d=8, c=4):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, c)
        self.trunk = nn.Sequential(nn.Linear(d, 50 * d), nn.Tanh(), nn.Linear(50 * d, d)).requires_grad_(False)

    def forward(self, x):   # in_proj_weight is used functionally inside MultiheadAttention
        return self.head(self.attn(x, x, x)[0].mean(1) + self.trunk(x).mean(1))


def test_multihead_attention_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = torch.randn(12, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    diff, (_, sb), _ = compare(lambda: _seeded(MHANet), x, steps=3)
    assert diff < 1e-10 and "attn.in_proj_weight belongs to MultiheadAttention, which has no" in caplog.text
    assert sb.last_pass_counts == {"forward": 2, "backward": 3}


def test_functional_use_detected_after_backward(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = tokens(7, T=3)
    diff, (_, sb), _ = compare(lambda: _seeded(Tokens, functional=True), x, steps=3)
    assert diff < 1e-10
    assert "rule did not see" in sb.one_backward.disabled and "switched off" in caplog.text


class Switching(Tokens):
    """Calls its layers normally, then (after `switch`) uses mid's weight functionally; has dropout."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.inp(x)))
        h2 = F.linear(h, self.mid.weight, self.mid.bias) if self.functional else self.mid(h)
        return self.head((h + torch.tanh(h2)).mean(1))


@pytest.mark.parametrize("check", [True, False])
def test_late_fallback_recomputes_with_same_dropout(caplog, check):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = tokens(12, T=3)
    models, opts = [], []
    for sb in (False, True):
        m = _seeded(Switching)
        opt = METHODS["focal_sam"](m.parameters(), one_backward=sb, one_backward_check=check, model=m)
        torch.manual_seed(7)
        for step in range(3):
            m.functional = step >= 1   # the hooks stop seeing `mid` from the second step on
            opt.step(lambda m=m: F.cross_entropy(m(x), LABELS, reduction="none"), targets=LABELS)
            if sb and step == 1:
                assert opt.last_pass_counts == {"forward": 3, "backward": 3}   # recomputed forward
        models.append(m)
        opts.append(opt)
    assert max_diff(models[1], weights(models[0])) < 1e-10
    assert "rule did not see" in opts[1].one_backward.disabled and "switched off" in caplog.text
    assert opts[1].last_pass_counts == {"forward": 2, "backward": 3}


def test_tied_weight_caught_by_first_step_check(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")

    class Tied(Tokens):
        def forward(self, x):   # mid is called (hooked) AND its weight is used functionally
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.mid(h)) + torch.tanh(F.linear(h, self.mid.weight))
            return self.head(h.mean(1))

    x = tokens(8, T=3)
    diff, (_, sb), _ = compare(lambda: _seeded(Tied), x, steps=3)
    assert diff < 1e-10 and "differ from the exact" in sb.one_backward.disabled


def test_batchnorm_in_training_mode_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="ft_focal")
    x = torch.randn(12, 5, dtype=torch.float64)

    def build():   # BatchNorm without trainable affine parameters, in training mode
        m = mlp(0, bn=True)
        m[1].weight.requires_grad_(False)
        m[1].bias.requires_grad_(False)
        return m
    diff, (_, sb), _ = compare(build, x)
    assert diff < 1e-12 and "BatchNorm1d in training mode mixes the samples" in caplog.text


def test_needs_model():
    with pytest.raises(ValueError, match="model="):
        FocalSAM(mlp().parameters(), torch.optim.SGD, class_counts=COUNTS, one_backward=True, lr=0.1)


class Attn(nn.Module):
    """A tiny attention block with Linear layers named q, k, v, o (the LoRA targets)."""

    def __init__(self, d=8, c=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, c)

    def forward(self, x):   # [B, T, D]
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8 ** 0.5, -1)
        h = x + self.o(a @ self.v(x))
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["focal_sam", "imbsam"])
def test_peft_lora(method):
    peft = pytest.importorskip("peft")

    def build():
        base = _seeded(Attn)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q", "v"],
                              modules_to_save=["head"], init_lora_weights=False)
        return peft.get_peft_model(base, cfg).double()

    x = torch.randn(12, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    m = build()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    diff, (_, sb), (m_ref, _) = compare(build, x, method=method, steps=3)
    assert diff < 1e-10 and max_diff(m_ref, weights(build())) > 1e-4
    assert sb.one_backward.disabled is None and sb.last_pass_counts == {"forward": 2, "backward": 2}


def _seeded(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).double()


def test_two_optimizers_on_one_model_each_split_their_own_steps():
    """Benchmarks drive one model with several one-backward optimizers: each re-binds the layers."""
    x = tokens(13, T=3)
    m = _seeded(AdaptNet)
    ps = [p for p in m.parameters() if p.requires_grad]
    opts = [METHODS[k](ps, one_backward=True, model=m) for k in ("focal_sam", "imbsam")]
    for _ in range(2):
        for opt in opts:
            opt.step(lambda: F.cross_entropy(m(x), LABELS, reduction="none"), targets=LABELS)
    assert all(o.one_backward.disabled is None and o.last_pass_counts == {"forward": 2, "backward": 2} for o in opts)


def test_remove_gives_the_layers_back_and_the_optimizer_runs_the_exact_path():
    """The strategy's state reaches each covered module through a class of the module's own, never
    through the module; OneBackward.remove(): every covered module has its own class again; the
    state_dict is unchanged, and the next steps equal those of an optimizer that never had the
    one-backward path."""
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m, plain = mlp(0), mlp(0)
    keys = list(m.state_dict())
    opt = METHODS["focal_sam"](m.parameters(), one_backward=True, model=m)
    assert type(m[0]) is not nn.Linear and isinstance(m[0], nn.Linear)   # swapped at construction
    covered = [layer for layer in m if type(layer).__dict__.get("one_backward_binding") is not None]
    assert len(covered) >= 2 and len({type(layer) for layer in covered}) == len(covered)   # a class per module
    assert all(type(layer).one_backward_binding.state is opt.one_backward.state for layer in covered)
    assert not [k for layer in m for k in vars(layer) if k.startswith("one_backward")]   # nothing on the module
    opt.one_backward.remove()
    assert [type(layer) for layer in m] == [type(layer) for layer in plain]
    assert not [k for layer in m for k in vars(layer) if k.startswith("one_backward")]
    assert list(m.state_dict()) == keys
    ref = METHODS["focal_sam"](plain.parameters(), one_backward=False, model=plain)
    for model, o in ((m, opt), (plain, ref)):
        for _ in range(2):
            o.step(lambda model=model: F.cross_entropy(model(x), LABELS, reduction="none"), targets=LABELS)
    assert max_diff(m, weights(plain)) == 0.0
    assert opt.last_pass_counts == ref.last_pass_counts == {"forward": 2, "backward": 3}


def test_the_old_keyword_names_still_work_with_a_deprecation_warning():
    from ft_focal.optim import build_optimizer

    m = mlp(0)
    with pytest.warns(DeprecationWarning, match="single_backward= is now one_backward="):
        opt = METHODS["focal_sam"](m.parameters(), single_backward=True, model=m)
    assert opt.one_backward is not None
    with pytest.warns(DeprecationWarning, match="single_backward_check= is now one_backward_check="):
        opt = build_optimizer("imbsam", list(m.parameters()), COUNTS, single_backward=True,
                              single_backward_check=False, model=m, lr=0.1)
    assert opt.one_backward is not None and opt.one_backward.validated   # check off: trusted from the start


def test_a_state_dict_with_the_old_key_names_restores_the_one_backward_state():
    """Checkpoints written before the rename hold "sb_validated" / "sb_disabled" in the wrapper state."""
    m = mlp(0)
    opt = METHODS["focal_sam"](m.parameters(), one_backward=True, model=m)
    x = torch.randn(12, 5, dtype=torch.float64)
    opt.step(lambda: F.cross_entropy(m(x), LABELS, reduction="none"), targets=LABELS)
    state = opt.state_dict()
    wrapper = state["wrapper"]
    old = dict(wrapper, sb_validated=wrapper.pop("one_backward_validated"), sb_disabled="a reason")
    del old["one_backward_disabled"]
    fresh = METHODS["focal_sam"](mlp(0).parameters(), one_backward=True, model=mlp(0))
    assert not fresh.one_backward.validated
    fresh.load_state_dict({"base_optimizer": state["base_optimizer"], "wrapper": old})
    assert fresh.one_backward.validated and fresh.one_backward.disabled == "a reason"


def test_auto_is_on_exactly_when_every_trainable_parameter_has_a_rule(caplog):
    """The default one_backward="auto": on with model= and every trainable parameter in a covered
    layer; off (one INFO line, exact 2F + 3B) when one is not; off without model= (the README's
    FocalSAM(params, SGD, ...))."""
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def two_steps(opt, m):
        for _ in range(2):
            opt.step(lambda: F.cross_entropy(m(x), LABELS, reduction="none"), targets=LABELS)
        return opt.last_pass_counts

    m = mlp(0)
    assert two_steps(METHODS["focal_sam"](m.parameters(), model=m), m) == {"forward": 2, "backward": 2}

    class WithBareScale(nn.Module):   # a parameter outside any layer with a rule
        def __init__(self):
            super().__init__()
            self.net, self.temperature = mlp(0), nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, inputs):
            return self.net(inputs) * self.temperature

    m = WithBareScale()
    with caplog.at_level(logging.INFO, logger="ft_focal.optim"):
        opt = METHODS["focal_sam"](m.parameters(), model=m)
    assert opt.one_backward is None and type(m.net[0]) is nn.Linear
    assert [r.getMessage() for r in caplog.records if "one_backward='auto': off" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert two_steps(opt, m) == {"forward": 2, "backward": 3}

    m = mlp(0)
    assert METHODS["focal_sam"](m.parameters()).one_backward is None
    assert two_steps(METHODS["imbsam"](m.parameters()), m) == {"forward": 2, "backward": 3}


MODEL_COUNTS = [100, 50, 20, 10, 5, 2]


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
        opt = FocalSAM(params, torch.optim.SGD, rho=0.05, gamma=1.0, lam=0.8, class_counts=MODEL_COUNTS, lr=0.1,
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
                             len(MODEL_COUNTS), [f"c{i}" for i in range(len(MODEL_COUNTS))]).to(dtype)
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
    opt = cls(params, torch.optim.SGD, class_counts=MODEL_COUNTS, lr=0.1, model=model, one_backward=single,
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
