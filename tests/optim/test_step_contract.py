"""The step's contract (ft_focal/optim/_step.py): the methods' default hyperparameters, the 0-d loss
path of ERM / SAM, the label range at its edge, and every one-line message a wrong call gets, word for
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
