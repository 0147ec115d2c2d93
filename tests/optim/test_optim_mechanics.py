"""Shared machinery: state_dict, non-finite skip, GradScaler, BatchNorm, accumulation, registry."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import batch, closure_for, max_diff, mlp, run, weights  # noqa: E402 (after the sys.path entry it needs)

from ft_focal.optim import CCSAM, ERM, OPTIMIZERS, SAM, SSESAM, FocalSAM, ImbSAM, build_optimizer, optimizer_kwargs  # noqa: E402 (after the sys.path entry it needs)

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
COUNTS = [100, 30, 8, 3]

MAKERS = {
    "erm": lambda m, **kw: ERM(m.parameters(), torch.optim.SGD, **SGD, **kw),
    "sam": lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD, **kw),
    "asam": lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, **SGD, **kw),
    "imbsam": lambda m, **kw: ImbSAM(m.parameters(), torch.optim.SGD, rho=0.1, class_counts=COUNTS,
                                     tail_weight=2.0, **SGD, **kw),
    "ccsam": lambda m, **kw: CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, rho=0.02, **SGD, **kw),
    "ccsam_cls": lambda m, **kw: CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, scope="classifier",
                                       classifier_params=list(m[-1].parameters()), rho=0.05, **SGD, **kw),
    "focal_sam": lambda m, **kw: FocalSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=1.0, lam=0.8,
                                          class_counts=COUNTS, **SGD, **kw),
    "focal_sam_sb": lambda m, **kw: FocalSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=1.0, lam=0.8,
                                             class_counts=COUNTS, one_backward=True, model=m, **SGD, **kw),
    "sse_sam": lambda m, **kw: SSESAM(m.parameters(), torch.optim.SGD, rho_head=0.05, rho_tail=0.2,
                                      class_counts=COUNTS, tail_threshold=40, **SGD, **kw),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_round_trip(name):
    x, y = batch()
    ref_model = mlp()
    ref = MAKERS[name](ref_model)
    if name == "sse_sam":
        ref.set_epoch(8, 10)
    run(ref, ref_model, x, y, 4)

    model = mlp()
    opt = MAKERS[name](model)
    if name == "sse_sam":
        opt.set_epoch(8, 10)
    run(opt, model, x, y, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = mlp(5)
    fresh.load_state_dict(saved_model)
    opt2 = MAKERS[name](fresh)
    opt2.load_state_dict(saved_opt)
    assert opt2.pass_counts == opt.pass_counts and opt2.skipped_steps == opt.skipped_steps
    if name == "sse_sam":
        assert opt2.switched and opt2.epoch == 8 and opt2.num_epochs == 10
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    run(opt2, fresh, x, y, 2)
    assert max_diff(fresh, weights(ref_model)) == 0.0
    assert opt2.pass_counts == ref.pass_counts


def test_param_groups_shared_with_scheduler_and_zero_grad():
    model = mlp()
    opt = MAKERS["focal_sam"](model)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    run(opt, model, x, y)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.set_epoch(3, 10)   # no-op outside SSE-SAM, but exists
    # after load_state_dict the scheduler still drives the (new) param groups
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def _poisoned(model, x, y, bad_call, value=float("inf")):
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        out = F.cross_entropy(model(x), y, reduction="none")
        if calls["n"] == bad_call:
            out = out * torch.tensor([value] + [1.0] * (len(y) - 1), dtype=out.dtype)
        return out
    return closure


@pytest.mark.parametrize("name,bad_call", [("sam", 2), ("sam", 1), ("focal_sam", 2), ("imbsam", 1),
                                           ("sse_sam", 3), ("ccsam", 4), ("focal_sam_sb", 1)])
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_pass_skips_the_step(name, bad_call, fused):
    """fused=True: the base kernel skips the update on the device (no host read)."""
    model, (x, y) = mlp(), batch()
    opt = MAKERS[name](model, fused=fused)
    run(opt, model, x, y)   # one good step: momentum buffers exist
    assert opt.skips_on_device() == fused
    w = weights(model)
    state = copy.deepcopy(opt.base_optimizer.state_dict())
    loss = opt.step(_poisoned(model, x, y, bad_call, float("nan") if bad_call == 1 else float("inf")), targets=y)
    assert opt.skipped_steps == 1
    assert max_diff(model, w) == 0.0
    after = opt.base_optimizer.state_dict()
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])
    assert isinstance(opt.last_skipped, torch.Tensor) == fused and bool(opt.last_skipped)
    if not fused:   # the fused kernel was handed the (non-finite) gradients and skipped them
        assert all(p.grad is None for p in model.parameters())
    if bad_call == 1:
        assert not torch.isfinite(loss)
    run(opt, model, x, y)   # training continues
    assert opt.skipped_steps == 1 and max_diff(model, w) > 0 and not bool(opt.last_skipped)


@pytest.mark.parametrize("name", ["sam", "focal_sam", "focal_sam_sb", "sse_sam"])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_fused_base_skipping_on_the_device_matches_the_host_path(name, base):
    """The same run (a non-finite step first, one later) with the fused base kernel skipping on the
    device and with the host read: same weights, same skip count; the first applied update reads."""
    kw = dict(lr=0.01, weight_decay=5e-4) if base is torch.optim.AdamW else SGD
    classes = {"sam": SAM, "focal_sam": FocalSAM, "focal_sam_sb": FocalSAM, "sse_sam": SSESAM}
    runs = []
    for fused in (False, True):
        model, (x, y) = mlp(), batch()
        opt = classes[name](model.parameters(), base, fused=fused, **kw, **_method_kwargs(name, model))
        for k in range(6):
            bad = k in (0, 3)
            opt.step(_poisoned(model, x, y, 1, float("nan")) if bad else closure_for(model, x, y), targets=y)
            assert opt.skips_on_device() == (fused and k >= 1)
        runs.append((model, opt.skipped_steps))
    (host, n_host), (dev, n_dev) = runs
    assert n_host == n_dev == 2
    assert max_diff(dev, weights(host)) < 1e-12


def _method_kwargs(name, model):
    return {"sam": dict(rho=0.1), "focal_sam": dict(rho=0.1, gamma=1.0, lam=0.8, class_counts=COUNTS),
            "focal_sam_sb": dict(rho=0.1, gamma=1.0, lam=0.8, class_counts=COUNTS, one_backward=True, model=model),
            "sse_sam": dict(rho_head=0.05, rho_tail=0.2, class_counts=COUNTS, tail_threshold=40)}[name]


@pytest.mark.parametrize("name", ["sam", "focal_sam", "focal_sam_sb", "ccsam"])
@pytest.mark.parametrize("applies", [False, True])
def test_grad_scaler_matches_unscaled(name, applies):
    x, y = batch()
    m_ref, m = mlp().float(), mlp().float()
    x = x.float()
    run(MAKERS[name](m_ref), m_ref, x, y, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    kw = dict(scaler=scaler)
    if applies:
        kw.update(backward_applies_scaler=True, backward=lambda loss, **k: scaler.scale(loss).backward(**k))
    opt = MAKERS[name](m, **kw)
    run(opt, m, x, y, 2)
    assert max_diff(m, weights(m_ref)) < 1e-6
    assert scaler.get_scale() == 2.0 ** 11    # two good steps with growth_interval 2
    assert opt.skipped_steps == 0


def test_grad_scaler_overflow_skips_and_backs_off():
    x, y = batch()
    m = mlp().float()
    x = x.float()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=3, backoff_factor=2.0 ** -100)
    opt = MAKERS["focal_sam"](m, scaler=scaler)
    w = weights(m)

    def closure():   # losses of ~20: scaled by 2^127 they overflow float32
        return 16 * F.cross_entropy(m(x), y, reduction="none")
    run(opt, m, x, y, closure=closure)
    assert opt.skipped_steps == 1 and max_diff(m, w) == 0.0
    assert scaler.get_scale() == 2.0 ** 27
    run(opt, m, x, y, 3, closure=closure)
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 28 and max_diff(m, w) > 0
    sd = opt.state_dict()
    assert sd["wrapper"]["growth_tracker"] == 0


@pytest.mark.parametrize("name", ["sam", "focal_sam", "sse_sam", "ccsam", "ccsam_cls"])
def test_batchnorm_stats_only_from_first_forward(name):
    model, (x, y) = mlp(bn=True), batch()
    probe = copy.deepcopy(model)
    probe(x)   # one forward at w in train mode
    opt = MAKERS[name](model, model=model)
    run(opt, model, x, y)
    bn, pbn = model[1], probe[1]
    assert torch.equal(bn.running_mean, pbn.running_mean) and torch.equal(bn.running_var, pbn.running_var)
    assert int(bn.num_batches_tracked) == 1
    # without model= the perturbed forward also updates them (shows the test has teeth)
    m2 = copy.deepcopy(probe)
    m2.load_state_dict(probe.state_dict())
    model2 = mlp(bn=True)
    run(MAKERS[name](model2), model2, x, y)
    assert int(model2[1].num_batches_tracked) > 1


@pytest.mark.parametrize("name", ["erm", "sam", "asam", "imbsam", "ccsam", "ccsam_cls", "focal_sam",
                                  "focal_sam_sb", "sse_sam"])
def test_accumulation_equals_big_batch(name):
    x, y = batch()
    big, acc = mlp(), mlp()
    run(MAKERS[name](big), big, x, y, 2)
    opt = MAKERS[name](acc)
    parts = [(x[:5], y[:5]), (x[5:], y[5:])]
    for _ in range(2):
        opt.step(closures=[closure_for(acc, xi, yi) for xi, yi in parts], targets=[yi for _, yi in parts])
    tol = 1e-6 if name == "ccsam_cls" else 1e-10   # classifier scope: class mean is per (whole) batch
    assert max_diff(acc, weights(big)) < tol


def test_accumulation_pass_counts_are_per_pass():
    x, y = batch()
    m = mlp()
    opt = MAKERS["focal_sam"](m)
    opt.step(closures=[closure_for(m, x[:6], y[:6]), closure_for(m, x[6:], y[6:])], targets=[y[:6], y[6:]])
    assert opt.last_pass_counts == {"forward": 2, "backward": 3}


def test_scalar_loss_and_targets_rules():
    x, y = batch()
    m = mlp()
    loss = ERM(m.parameters(), torch.optim.SGD, lr=0.1).step(lambda: F.cross_entropy(m(x), y))
    assert loss.dim() == 0 and not loss.requires_grad
    SAM(m.parameters(), torch.optim.SGD, lr=0.1).step(lambda: F.cross_entropy(m(x), y))
    opt = MAKERS["focal_sam"](m)
    with pytest.raises(ValueError, match="targets"):
        opt.step(closure_for(m, x, y))
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(lambda: F.cross_entropy(m(x), y), targets=y)
    with pytest.raises(ValueError, match="out of range"):
        opt.step(closure_for(m, x, y), targets=y + 10)


def test_returned_loss_is_mean_loss_at_w():
    x, y = batch()
    m = mlp()
    expect = F.cross_entropy(m(x), y).detach()
    loss = run(MAKERS["focal_sam"](m), m, x, y)
    assert torch.allclose(loss, expect, atol=1e-14, rtol=0)


def test_registry():
    assert set(OPTIMIZERS) == {"erm", "sam", "asam", "imbsam", "ccsam", "focal_sam", "sse_sam"}
    m = mlp()
    opt = build_optimizer("focal_sam", m.parameters(), COUNTS, base="sgd", lr=0.01, momentum=0.9,
                          weight_decay=5e-4, nesterov=False, betas=(0.9, 0.99), rho=0.05, gamma=0.5, lam=0.8)
    assert isinstance(opt, FocalSAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
    opt = build_optimizer("asam", m.parameters(), None, base="adamw", lr=1e-3, momentum=0.9, rho=1.0)
    assert opt.adaptive and isinstance(opt.base_optimizer, torch.optim.AdamW)
    opt = build_optimizer("sse_sam", m.parameters(), COUNTS, rho_head=0.1, rho_tail=0.2, model=m)
    assert isinstance(opt, SSESAM) and opt.runtime.model is m
    with pytest.raises(ValueError, match="'nope'.*erm"):
        build_optimizer("nope", m.parameters(), COUNTS)
    with pytest.raises(ValueError, match="'gama'.*gamma"):
        build_optimizer("focal_sam", m.parameters(), COUNTS, gama=0.5)
    with pytest.raises(ValueError, match="'rho'"):
        build_optimizer("erm", m.parameters(), COUNTS, rho=0.1)
    with pytest.raises(ValueError, match="'lion'"):
        build_optimizer("sam", m.parameters(), COUNTS, base="lion")
    with pytest.raises(ValueError, match="class_counts"):
        build_optimizer("imbsam", m.parameters(), None)
    assert optimizer_kwargs("focal_sam")[:3] == ("rho", "gamma", "lam")
    assert "adaptive" not in optimizer_kwargs("asam") and "adaptive" in optimizer_kwargs("sam")
    assert set(optimizer_kwargs("ccsam")) == {"rho", "scope", "flat_ratio"}
    with pytest.raises(ValueError, match="valid"):
        optimizer_kwargs("bogus")


def test_optim_imports_nothing_else_from_ft_focal():
    import ast
    import pathlib

    import ft_focal.optim as pkg
    for f in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("ft_focal"), f
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("ft_focal") for a in node.names), f
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{f} imports from outside ft_focal.optim")


def test_runtime_keywords_hand_over_the_objects_themselves_and_for_accelerate_reads_the_accelerator():
    """The host's objects reach the optimizer as they are (a copy of the model would be a second model
    that training never touches), and no_sync wraps the module the host has at step time."""
    from types import SimpleNamespace

    from ft_focal.optim import Runtime

    model = mlp()
    calls = []
    accelerator = SimpleNamespace(backward=lambda loss, **kw: None, scaler=object(), num_processes=2,
                                  no_sync=lambda module: calls.append(module))
    wrapped = {"now": "not yet prepared"}
    runtime = Runtime.for_accelerate(accelerator, model, lambda: wrapped["now"])
    keywords = runtime.keywords()
    assert keywords["model"] is model and keywords["scaler"] is accelerator.scaler
    assert keywords["backward"] is accelerator.backward and keywords["backward_applies_scaler"] is True
    wrapped["now"] = "ddp module"
    keywords["no_sync"]()
    assert calls == ["ddp module"]
    assert Runtime.for_accelerate(accelerator, model, lambda: None, no_sync=False).no_sync is None
    single = SimpleNamespace(backward=accelerator.backward, scaler=None, num_processes=1)
    assert Runtime.for_accelerate(single, model, lambda: None).keywords()["scaler"] is None
