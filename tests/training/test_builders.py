"""The builders called directly (ft_focal/training/builders.py): the LR schedule at its edges, the
recipe's loss and optimizer keys reaching what gets built (checked by the updates it makes), the
Accelerator's precision and trackers, and the one-line errors for a bad value or tracker.
tests/training/test_recipe_wiring.py checks the same through every shipped recipe's built run."""

import contextlib
import copy
import dataclasses
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ft_focal.config import load_recipe
from ft_focal.errors import UserError
from ft_focal.training.builders import (
    build_loss_from,
    build_optimizer_from,
    check_trackers,
    lr_lambda,
    make_accelerator,
    method_kwargs,
)

WARMUP, TOTAL = 4, 20


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warm_up_is_linear_from_one_step_and_reaches_the_base_lr_at_its_end(kind):
    factor = lr_lambda(kind, WARMUP, TOTAL)
    assert [factor(s) for s in range(WARMUP)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(WARMUP) == 1.0   # the first update after warm-up: progress 0


def test_cosine_decays_over_the_updates_after_warm_up_to_zero():
    factor = lr_lambda("cosine", WARMUP, TOTAL)
    for step in (5, 9, 12, 17):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        assert factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-15)
    assert factor(TOTAL) == pytest.approx(0.0, abs=1e-15) and factor(TOTAL + 5) == pytest.approx(0.0, abs=1e-15)


def test_linear_decays_to_zero_and_constant_stays_at_one():
    linear, constant = lr_lambda("linear", WARMUP, TOTAL), lr_lambda("constant", WARMUP, TOTAL)
    assert [linear(s) for s in (4, 8, 12, 20, 30)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert [constant(s) for s in (4, 12, 20, 30)] == [1.0, 1.0, 1.0, 1.0]


def test_without_warm_up_the_first_update_is_at_the_base_lr():
    assert lr_lambda("cosine", 0, 10)(0) == 1.0 and lr_lambda("linear", 0, 10)(5) == 0.5
    assert lr_lambda("linear", 0, 1)(0) == 1.0 and lr_lambda("linear", 0, 1)(1) == 0.0   # one update: no division by 0


def _recipe(**loss):
    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "digits_lt_focal_sam.yaml"))
    return dataclasses.replace(recipe, loss=dataclasses.replace(recipe.loss, **loss))


def test_the_recipes_loss_keys_reach_the_loss_and_unset_ones_keep_the_defaults():
    loss = build_loss_from(_recipe(name="vs", vs_gamma=0.2, vs_tau=None), [50, 10, 5])
    assert (loss.gamma, loss.tau) == (0.2, 0.75)
    loss = build_loss_from(_recipe(name="focal", focal_gamma=1.0), [50, 10, 5])
    assert loss.gamma == 1.0


def test_a_bad_loss_value_is_one_line_naming_the_section():
    with pytest.raises(UserError, match=r"^recipe section 'loss': max_m must be >= 0, got -1.0$"):
        build_loss_from(_recipe(name="ldam", max_m=-1.0), [50, 10, 5])


def test_trackers_unknown_or_not_installed_are_one_line_and_known_ones_pass_once(monkeypatch):
    import accelerate.tracking as tracking

    # which trackers are installed differs between machines: say which are, so every branch runs here
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(UserError, match=r"^recipe key 'train.log_with': unknown tracker 'nope' "
                                        r"\(valid: aim, clearml, comet_ml, .*tensorboard.*wandb"):
        check_trackers(["nope"])
    with pytest.raises(UserError, match=r"^recipe key 'train.log_with': tracker 'wandb' is not installed "
                                        r"\(pip install wandb\)$"):
        check_trackers(["tensorboard", "wandb"])
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert check_trackers([]) == []


def _with_optim(**optim):
    recipe = _recipe()
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, **optim))


class _Net(nn.Module):
    """A body and a `head` (the classifier CC-SAM perturbs), float64 so that updates compare exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _cpu_accelerator(**overrides):
    """What build_optimizer_from reads of an Accelerator, for one CPU process without a scaler."""
    fields = dict(device=torch.device("cpu"), num_processes=1, scaler=None,
                  backward=lambda loss, **kwargs: loss.backward(**kwargs))
    return SimpleNamespace(**{**fields, **overrides})


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(9, 5, generator=g, dtype=torch.float64), torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])


def _assert_built_erm_is_torchs(recipe, torch_optimizer, updates):
    """`updates` steps of the ERM the recipe builds equal `torch_optimizer(params)` on a copy."""
    model, x, y = _Net(), *_batch()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer_from(recipe, model, model, [40, 30, 20], _cpu_accelerator())
    plain = torch_optimizer(reference.parameters())
    for _ in range(updates):
        optimizer.step(lambda: F.cross_entropy(model(x), y, reduction="none"), targets=y)
        plain.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        plain.step()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_nesterov_weight_decay_and_lr_reach_the_base_optimizer(nesterov):
    """ERM over SGD is torch's SGD: three updates equal torch.optim.SGD with the recipe's values.
    Momentum and Nesterov only show from the second update on."""
    recipe = _with_optim(name="erm", base="sgd", lr=0.3, momentum=0.7, nesterov=nesterov, weight_decay=0.05)
    _assert_built_erm_is_torchs(
        recipe, lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.7, nesterov=nesterov, weight_decay=0.05), 3)


def test_adamw_gets_no_sgd_keys_and_its_update_is_torchs():
    recipe = _with_optim(name="erm", base="adamw", lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True)
    _assert_built_erm_is_torchs(recipe, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), 2)


@pytest.mark.parametrize(("fused", "device", "expected"), [
    (None, "cpu", False),    # null: fused on CUDA only
    (None, "cuda", True),
    (True, "cpu", True),
    (False, "cuda", False),
])
def test_fused_is_the_recipes_choice_and_null_means_on_cuda_only(fused, device, expected):
    """The device only decides here; the parameters stay on the CPU, where torch's fused SGD runs too."""
    model = _Net()
    optimizer = build_optimizer_from(_with_optim(name="erm", fused=fused), model, model, [40, 30, 20],
                                     _cpu_accelerator(device=torch.device(device)))
    assert bool(optimizer.base_optimizer.defaults.get("fused")) is expected


def test_one_backward_null_is_auto_on_for_a_covered_model_and_false_keeps_the_exact_path():
    """Every trainable tensor of _Net sits in a Linear (a layer with a rule): auto turns the path on."""
    counts = [40, 30, 20]
    auto = build_optimizer_from(_with_optim(name="focal_sam", one_backward=None), _Net(), _Net(), counts,
                                _cpu_accelerator())
    off = build_optimizer_from(_with_optim(name="focal_sam", one_backward=False), _Net(), _Net(), counts,
                               _cpu_accelerator())
    assert auto.one_backward is not None and off.one_backward is None
    assert method_kwargs(_with_optim(name="focal_sam", one_backward=None))["one_backward"] == "auto"
    assert method_kwargs(_with_optim(name="imbsam", one_backward=True))["one_backward"] is True


def test_keys_the_method_does_not_take_are_dropped_with_one_line_naming_them(caplog):
    recipe = _with_optim(name="sam", rho=0.07, gamma=1.5, lam=0.4, one_backward=True)
    with caplog.at_level(logging.INFO, logger="ft_focal.training.builders"):
        assert method_kwargs(recipe) == {"rho": 0.07}
    assert caplog.messages == [
        "optim.name=sam does not take optim.gamma=1.5, optim.lam=0.4: ignored",
        "optim.name=sam does not take optim.one_backward=true (only imbsam, focal_sam, sse_sam do): ignored"]


def test_ccsam_in_classifier_scope_perturbs_the_heads_parameters():
    """The built CC-SAM's update equals CCSAM given `model.head`'s parameters by hand (a different
    classifier set, or none, changes the update or refuses scope='classifier')."""
    from ft_focal.optim import CCSAM

    x, y = _batch()
    built_model, hand_model, body_model = _Net(), _Net(), _Net()
    recipe = _with_optim(name="ccsam", scope="classifier", rho=0.5, flat_ratio=0.3, lr=0.1, momentum=0.0,
                         weight_decay=0.0)
    built = build_optimizer_from(recipe, built_model, built_model, [40, 30, 20], _cpu_accelerator())

    def by_hand(model, classifier):
        return CCSAM(model.parameters(), torch.optim.SGD, class_counts=[40, 30, 20], scope="classifier",
                     classifier_params=list(classifier.parameters()), rho=0.5, flat_ratio=0.3, lr=0.1,
                     momentum=0.0, weight_decay=0.0, model=model)

    runs = ((built, built_model), (by_hand(hand_model, hand_model.head), hand_model),
            (by_hand(body_model, body_model.body), body_model))
    for optimizer, model in runs:
        optimizer.step(lambda model=model: F.cross_entropy(model(x), y, reduction="none"), targets=y)
    for got, want in zip(built_model.parameters(), hand_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # the comparison can fail: the body as the classifier gives another update
    assert not torch.allclose(built_model.body.weight, body_model.body.weight, rtol=1e-9, atol=0)


def test_a_frozen_model_or_a_bad_optim_value_is_one_line_naming_the_section():
    model = _Net().requires_grad_(False)
    with pytest.raises(UserError, match=r"^the recipe's tuning leaves no trainable parameter \(check 'tuning.method'\)$"):
        build_optimizer_from(_with_optim(name="erm"), model, model, [40, 30, 20], _cpu_accelerator())
    model = _Net()
    with pytest.raises(UserError, match=r"^recipe section 'optim': "):
        build_optimizer_from(_with_optim(name="focal_sam", rho=-1.0), model, model, [40, 30, 20], _cpu_accelerator())


def test_no_sync_is_given_to_the_optimizer_only_under_ddp():
    entered = []
    fake = _cpu_accelerator(num_processes=2, no_sync=lambda wrapped: entered.append(wrapped) or contextlib.nullcontext())
    model = _Net()
    optimizer = build_optimizer_from(_with_optim(name="sam", rho=0.05), model, model, [40, 30, 20], fake)
    assert optimizer.runtime.no_sync is not None
    optimizer.runtime.no_sync()
    assert entered == [model]
    single = build_optimizer_from(_with_optim(name="sam", rho=0.05), model, model, [40, 30, 20], _cpu_accelerator())
    assert single.runtime.no_sync is None
    sam = _with_optim(name="sam", rho=0.05)
    fsdp = dataclasses.replace(sam, train=dataclasses.replace(sam.train, fsdp=True))   # FSDP2: the optimizer sees DTensors
    assert build_optimizer_from(fsdp, model, model, [40, 30, 20], fake).runtime.no_sync is None


def test_the_accelerator_gets_the_recipes_precision_and_project_dir_and_says_when_launch_disagrees(
        tmp_path, monkeypatch, caplog):
    recipe = dataclasses.replace(_recipe(), output_dir=str(tmp_path / "run"))
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, mixed_precision="no", log_with=None))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="ft_focal.training.builders"):
        accelerator = make_accelerator(recipe)
    assert accelerator.mixed_precision == "no" and accelerator.log_with == []
    assert accelerator.project_configuration.project_dir == str(tmp_path / "run")
    assert accelerator.project_configuration.logging_dir == str(tmp_path / "run" / "logs")
    assert ("accelerate launch asked for mixed precision 'bf16' but the recipe's train.mixed_precision is 'no': "
            "the recipe wins (override it with train.mixed_precision=bf16)") in caplog.text


def test_the_trackers_the_recipe_names_reach_the_accelerator_and_none_means_none(tmp_path, monkeypatch):
    """No tracker package is a dependency, so the Accelerator is replaced by a recorder here."""
    import accelerate.tracking as tracking

    import ft_focal.training.accelerator as accelerator_module

    monkeypatch.setattr(tracking, "get_available_trackers", lambda: ["tensorboard"])
    calls = []
    monkeypatch.setattr(accelerator_module, "make_accelerator", lambda **kwargs: calls.append(kwargs))
    base = dataclasses.replace(_recipe(), output_dir=str(tmp_path))
    for log_with in (["tensorboard", "tensorboard"], [], None):
        make_accelerator(dataclasses.replace(base, train=dataclasses.replace(base.train, log_with=log_with)))
    assert [call["log_with"] for call in calls] == [["tensorboard"], None, None]


def test_the_optimizer_back_propagates_through_the_accelerator_and_its_fp16_scaler():
    """Under fp16 accelerator.backward scales the loss itself and the optimizer unscales with the
    accelerator's GradScaler: the update equals the unscaled one, and the scaler's growth counts the
    step. Without a scaler every backward still goes through accelerator.backward."""
    x, y = _batch()
    x = x.float()
    reference = _Net().float()
    build_optimizer_from(_with_optim(name="sam", rho=0.05), reference, reference, [40, 30, 20], _cpu_accelerator())\
        .step(lambda: F.cross_entropy(reference(x), y, reduction="none"), targets=y)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
    calls = []

    def scaled_backward(loss, **kwargs):
        calls.append(loss)
        scaler.scale(loss).backward(**kwargs)

    model = _Net().float()
    optimizer = build_optimizer_from(_with_optim(name="sam", rho=0.05), model, model, [40, 30, 20],
                                     _cpu_accelerator(scaler=scaler, backward=scaled_backward))
    optimizer.step(lambda: F.cross_entropy(model(x), y, reduction="none"), targets=y)
    assert len(calls) == 2   # SAM: two backwards, both through the accelerator
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 13   # one good step, growth_interval 1

    plain_calls = []
    model = _Net().float()
    plain = _cpu_accelerator(backward=lambda loss, **kwargs: plain_calls.append(loss) or loss.backward(**kwargs))
    build_optimizer_from(_with_optim(name="sam", rho=0.05), model, model, [40, 30, 20], plain)\
        .step(lambda: F.cross_entropy(model(x), y, reduction="none"), targets=y)
    assert len(plain_calls) == 2
