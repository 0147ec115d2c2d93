"""The step's contract (ft_focal/optim/_step.py): the methods' default hyperparameters, the 0-d loss
path of ERM / SAM and their per-sample losses without labels, the label range at its edge, the fp16
unscale fallback, a resumed GradScaler's growth, and every one-line message a wrong call gets, word for
word. Defaults: Focal-SAM rho = 0.05, gamma = 0.5, lam = 0.8 (docs/algorithms.md; Li et al. 2025)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from ft_focal.optim import ERM, SAM, FocalSAM

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import RefSGD, batch, max_diff, mlp, ref_focal, ref_run, ref_sam, run, weights  # noqa: E402 (after the sys.path entry it needs)

COUNTS = [100, 30, 8, 3]


def test_focal_sam_without_hyperparameters_is_the_papers_rho_gamma_lam():
    x, y = batch()
    m = mlp(0)
    w = weights(m)
    run(FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1), m, x, y)
    ref = ref_run(m, w, x, y, lambda v: ref_focal(m, v, x, y, 0.05, 0.5, 0.8, COUNTS), RefSGD(0.1))
    assert max_diff(m, ref) < 1e-12


def test_focal_sam_with_rho_0_is_the_plain_gradient_step():
    """rho = 0 is allowed: no perturbation, so g1 + g3 = grad of the mean loss at w."""
    x, y = batch()
    m, plain = mlp(0), mlp(0)
    run(FocalSAM(m.parameters(), torch.optim.SGD, rho=0.0, class_counts=COUNTS, lr=0.1), m, x, y)
    run(ERM(plain.parameters(), torch.optim.SGD, lr=0.1), plain, x, y)
    assert max_diff(m, weights(plain)) < 1e-12


def test_a_negative_rho_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^rho must be non-negative, got -0.1$"):
        FocalSAM(mlp(0).parameters(), torch.optim.SGD, rho=-0.1, class_counts=COUNTS, lr=0.1)


@pytest.mark.parametrize("with_targets", [True, False])
def test_sam_takes_a_mean_loss_as_it_takes_per_sample_losses(with_targets):
    """The 0-d path: a mean over B samples counts as B samples (the total batch size)."""
    x, y = batch()
    m = mlp(0)
    w = weights(m)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    loss = opt.step(lambda: F.cross_entropy(m(x), y), targets=y if with_targets else None)
    ref = ref_run(m, w, x, y, lambda v: ref_sam(m, v, x, y, 0.05), RefSGD(0.1))
    assert max_diff(m, ref) < 1e-12
    assert abs(float(loss) - float(F.cross_entropy(mlp(0)(x), y))) < 1e-12


def test_the_returned_loss_is_the_mean_at_w_over_every_micro_batch():
    x, y = batch()
    m = mlp(0)
    expected = float(F.cross_entropy(m(x), y))
    opt = ERM(m.parameters(), torch.optim.SGD, lr=0.1)
    halves = [slice(0, 5), slice(5, 12)]
    loss = opt.step(closures=[lambda s=s: F.cross_entropy(m(x[s]), y[s], reduction="none") for s in halves],
                    targets=[y[s] for s in halves])
    assert abs(float(loss) - expected) < 1e-12


def test_the_largest_label_is_accepted_and_one_past_it_is_refused():
    x, y = batch()
    m = mlp(0)
    opt = FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1)
    top = torch.full_like(y, len(COUNTS) - 1)
    opt.step(lambda: F.cross_entropy(m(x), top, reduction="none"), targets=top)   # label C - 1: fine
    fresh = FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS[:3], lr=0.1)
    with pytest.raises(ValueError, match=r"^label 3 out of range for class_counts of length 3$"):
        fresh.step(lambda: F.cross_entropy(m(x), top, reduction="none"), targets=top)


def _focal(m):
    return FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1)


@pytest.mark.parametrize("call, message", [
    (lambda opt, m, x, y: opt.step(), r"^step\(\) needs a closure returning per-sample losses \(or closures=\[\.\.\.\]\)$"),
    (lambda opt, m, x, y: opt.step(lambda: [1.0], targets=y),
     r"^the closure must return a tensor of per-sample losses$"),
    (lambda opt, m, x, y: opt.step(lambda: F.cross_entropy(m(x), y), targets=y),
     r"^FocalSAM needs per-sample losses of shape \[B\] \(use reduction='none'\); the closure returned a scalar$"),
    (lambda opt, m, x, y: opt.step(lambda: F.cross_entropy(m(x), y, reduction="none")[:5], targets=y),
     r"^the closure must return per-sample losses of shape \[12\], got \(5,\)$"),
    (lambda opt, m, x, y: opt.step(lambda: F.cross_entropy(m(x), y, reduction="none")),
     r"^FocalSAM.step needs targets= \(the labels of the batch\)$"),
    (lambda opt, m, x, y: opt.step(closures=[lambda: None, lambda: None], targets=[y]),
     r"^got 2 closures but 1 targets$"),
    (lambda opt, m, x, y: opt.step(closures=[lambda: None, lambda: None]),
     r"^micro-batch lists need targets=\[y1, y2, \.\.\.\] \(to know the total batch size\)$"),
])
def test_a_wrong_call_gets_one_line_that_says_what_is_wrong(call, message):
    x, y = batch()
    m = mlp(0)
    opt = _focal(m)
    with pytest.raises(ValueError, match=message):
        call(opt, m, x, y)


def test_a_shape_error_without_targets_says_b():
    x, y = batch()
    m = mlp(0)
    opt = ERM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^the closure must return per-sample losses of shape \[B\], got \(12, 4\)$"):
        opt.step(lambda: F.cross_entropy(m(x), y, reduction="none")[:, None].expand(12, 4))


def test_one_erm_step_leaves_the_applied_gradient_and_no_check_backward():
    x, y = batch()
    m = mlp(0)
    opt = ERM(m.parameters(), torch.optim.SGD, lr=0.1)
    run(opt, m, x, y)
    assert opt.last_check_backwards == 0 and opt.describe_last_passes() == \
        "1F + 1B (forward / backward passes over the batch)"
    assert all(p.grad is not None for p in m.parameters())


def test_sam_without_targets_takes_per_sample_losses_and_counts_their_samples():
    """ERM / SAM need no labels: the batch size is the closure's number of losses."""
    x, y = batch()
    m = mlp(0)
    w = weights(m)
    loss = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1).step(
        lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert max_diff(m, ref_run(m, w, x, y, lambda v: ref_sam(m, v, x, y, 0.05), RefSGD(0.1))) < 1e-12
    assert abs(float(loss) - float(F.cross_entropy(mlp(0)(x), y))) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_without_the_fused_unscale_kernel_the_fallback_unscales_and_flags_the_same(monkeypatch, dtype):
    """Devices or dtypes that lack torch._amp_foreach_non_finite_check_and_unscale_ take the
    foreach fallback in _numerics.unscale_and_check: same gradients, same verdict."""
    from ft_focal.optim import _numerics as nm

    def grads(bad):
        out = [torch.arange(6, dtype=dtype).reshape(2, 3) - 2.5, None, torch.full((4,), 3.0, dtype=dtype)]
        if bad:
            out[2][1] = float("inf")
        return out

    def unscale(bad, inv_scale):
        g, found = grads(bad), {}
        nm.unscale_and_check(g, found, inv_scale)
        return g, float(nm.any_found(found, torch.device("cpu"), 1))

    for bad in (False, True):
        for inv in ({torch.device("cpu"): torch.tensor(0.25)}, {}):   # {}: no scaler, factor 1
            fused = unscale(bad, dict(inv))
            with monkeypatch.context() as patch:
                patch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                              lambda *a: (_ for _ in ()).throw(NotImplementedError("no kernel")))
                fallback = unscale(bad, dict(inv))
            assert fused[1] == fallback[1] == float(bad)
            assert fused[0][1] is None and fallback[0][1] is None
            for a, b in zip(fused[0][::2], fallback[0][::2], strict=True):
                assert torch.equal(a, b) and a.dtype == dtype
            factor = 0.25 if inv else 1.0
            assert torch.equal(fallback[0][0], (torch.arange(6, dtype=dtype).reshape(2, 3) - 2.5) * factor)


def test_a_donated_buffer_error_names_the_setting_and_other_errors_pass_unchanged():
    """torch.compile's donated buffers forbid a second backward of one graph (builders.compile_model
    turns them off); anyone compiling themselves gets told which setting."""
    x, y = batch()
    m = mlp(0)

    def failing(message):
        def backward(loss, **kwargs):
            raise RuntimeError(message)
        return FocalSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1, backward=backward)

    with pytest.raises(RuntimeError, match=r"^FocalSAM back-propagates one forward twice, which a model compiled "
                                           r"with torch.compile forbids unless torch._functorch.config."
                                           r"donated_buffer = False is set before compiling$"):
        run(failing("This backward function was compiled with non-empty donated buffer ..."), m, x, y)
    with pytest.raises(RuntimeError, match=r"^something else$"):
        run(failing("something else"), m, x, y)


def test_a_resumed_grad_scaler_grows_on_the_schedule_it_had():
    """The growth tracker (good steps since the last change of scale) is saved with the optimizer and
    restored into the scaler at the next step: growth_interval 2, one good step before the save, so
    the first good step after the load doubles the scale."""
    x, y = batch()
    x = x.float()

    def fresh():
        m = mlp(0).float()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        return m, scaler, SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, scaler=scaler)

    m, scaler, opt = fresh()
    run(opt, m, x, y)
    state = opt.state_dict()
    assert state["wrapper"]["growth_tracker"] == 1 and scaler.get_scale() == 2.0 ** 10
    m2, scaler2, opt2 = fresh()   # same scale, its tracker at 0: only the optimizer's state knows it is 1
    opt2.load_state_dict(state)
    run(opt2, m2, x, y)
    assert scaler2.get_scale() == 2.0 ** 11
    run(opt2, m2, x, y)   # restored once: the tracker counts afresh from the growth (1 of 2 good steps)
    assert scaler2.get_scale() == 2.0 ** 11 and opt2.state_dict()["wrapper"]["growth_tracker"] == 1
