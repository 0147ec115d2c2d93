"""Each method's contract beyond its update rule (tests/optim/test_optim_reference.py has the rules):
the defaults of docs/algorithms.md, checked by the update they give (the default equals the value
written out, and a neighbouring value gives another update); rho = 0 and flat_ratio 0 / 1 accepted
and the values past them refused in one line; CC-SAM's label range; SSE-SAM's stage in its state."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from ft_focal.optim import CCSAM, SAM, SSESAM, ImbSAM

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import batch, max_diff, mlp, run, weights  # noqa: E402 (after the sys.path entry it needs)

# class 2 has exactly 20 samples and class 1 exactly 100: the default thresholds sit on them
COUNTS = [400, 100, 20, 3]


def _after_one_step(cls, **kwargs):
    x, y = batch()
    m = mlp(0)
    opt = cls(m.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    if cls is SSESAM:
        opt.set_epoch(0, 10)
    run(opt, m, x, y)
    return m


@pytest.mark.parametrize("cls, fixed, key, default, neighbour", [
    (SAM, {}, "rho", 0.05, 0.06),
    (SAM, dict(rho=1.0, adaptive=True), "eta", 0.0, 0.01),
    (ImbSAM, dict(class_counts=COUNTS, tail_weight=2.0), "rho", 0.05, 0.06),
    (ImbSAM, dict(class_counts=COUNTS, tail_weight=2.0), "tail_threshold", 20, 21),
    (SSESAM, dict(class_counts=COUNTS), "rho_head", 0.05, 0.06),
    (SSESAM, dict(class_counts=COUNTS), "rho_tail", 0.1, 0.11),
    (SSESAM, dict(class_counts=COUNTS), "tail_threshold", 100, 101),
    (CCSAM, dict(class_counts=COUNTS), "rho", 1.0, 1.1),
    (CCSAM, dict(class_counts=COUNTS), "flat_ratio", 0.3, 0.31),
])
def test_a_default_is_the_documented_value_by_the_update_it_gives(cls, fixed, key, default, neighbour):
    implicit = _after_one_step(cls, **fixed)
    assert max_diff(implicit, weights(_after_one_step(cls, **fixed, **{key: default}))) == 0.0
    assert max_diff(implicit, weights(_after_one_step(cls, **fixed, **{key: neighbour}))) > 1e-9


def test_sse_sam_switches_at_the_documented_fraction_of_the_epochs():
    opt = SSESAM(mlp(0).parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1)
    switched = []
    for epoch in range(10):
        opt.set_epoch(epoch, 10)
        switched.append(opt.state_dict()["wrapper"]["switched"])
    assert switched == [False] * 7 + [True] * 3   # switch_fraction 0.7 of 10 epochs


@pytest.mark.parametrize("make", [
    lambda p: SAM(p, torch.optim.SGD, rho=0.0, lr=0.1),
    lambda p: ImbSAM(p, torch.optim.SGD, rho=0.0, class_counts=COUNTS, lr=0.1),
    lambda p: SSESAM(p, torch.optim.SGD, rho_head=0.0, rho_tail=0.0, class_counts=COUNTS, lr=0.1),
    lambda p: CCSAM(p, torch.optim.SGD, rho=0.0, class_counts=COUNTS, lr=0.1),
    lambda p: CCSAM(p, torch.optim.SGD, flat_ratio=0.0, class_counts=COUNTS, lr=0.1),
    lambda p: CCSAM(p, torch.optim.SGD, flat_ratio=1.0, class_counts=COUNTS, lr=0.1),
])
def test_the_edges_of_each_range_are_accepted(make):
    x, y = batch()
    m = mlp(0)
    run(make(m.parameters()), m, x, y)


@pytest.mark.parametrize("make, message", [
    (lambda p: SAM(p, torch.optim.SGD, rho=-0.01, lr=0.1), r"^rho must be non-negative, got -0.01$"),
    (lambda p: SAM(p, torch.optim.SGD, eta=-0.01, lr=0.1), r"^eta must be non-negative, got -0.01$"),
    (lambda p: ImbSAM(p, torch.optim.SGD, rho=-0.01, class_counts=COUNTS, lr=0.1),
     r"^rho must be non-negative, got -0.01$"),
    (lambda p: SSESAM(p, torch.optim.SGD, rho_head=-0.01, class_counts=COUNTS, lr=0.1),
     r"^rho_head and rho_tail must be non-negative, got -0.01, 0.1$"),
    (lambda p: SSESAM(p, torch.optim.SGD, rho_tail=-0.01, class_counts=COUNTS, lr=0.1),
     r"^rho_head and rho_tail must be non-negative, got 0.05, -0.01$"),
    (lambda p: CCSAM(p, torch.optim.SGD, rho=-0.01, class_counts=COUNTS, lr=0.1), r"^rho must be non-negative, got -0.01$"),
    (lambda p: CCSAM(p, torch.optim.SGD, flat_ratio=1.01, class_counts=COUNTS, lr=0.1),
     r"^flat_ratio must be in \[0, 1\], got 1.01$"),
    (lambda p: CCSAM(p, torch.optim.SGD, flat_ratio=-0.01, class_counts=COUNTS, lr=0.1),
     r"^flat_ratio must be in \[0, 1\], got -0.01$"),
    (lambda p: CCSAM(p, torch.optim.SGD, scope="layer", class_counts=COUNTS, lr=0.1),
     r"^scope must be 'network' or 'classifier', got 'layer'$"),
    (lambda p: CCSAM(p, torch.optim.SGD, scope="classifier", class_counts=COUNTS, lr=0.1),
     r"^scope='classifier' needs classifier_params= \(the head's parameters\)$"),
])
def test_a_value_past_the_edge_is_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message):
        make(mlp(0).parameters())


def test_ccsam_takes_the_largest_label_and_refuses_one_past_it():
    x, y = batch()
    m = mlp(0)
    top = torch.full_like(y, 3)
    CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1).step(
        lambda: F.cross_entropy(m(x), top, reduction="none"), targets=top)
    short = CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS[:3], lr=0.1)
    with pytest.raises(ValueError, match=r"^label 3 out of range for class_counts of length 3$"):
        short.step(lambda: F.cross_entropy(m(x), top, reduction="none"), targets=top)


def test_ccsam_refuses_a_classifier_outside_the_optimizers_parameters():
    x, y = batch()
    m, other = mlp(0), mlp(1)
    opt = CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, scope="classifier",
                classifier_params=list(other[-1].parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"^none of classifier_params is a trainable parameter of this optimizer$"):
        run(opt, m, x, y)


@pytest.mark.parametrize("counts, accepted", [
    ([5, 0, 2], True),        # a class without training images is still a class (its accuracy is 0)
    ((7,), True),
    (torch.tensor([3, 1]), True),
    ([], False),
    (None, False),
    ([[1, 2], [3, 4]], False),
    ([4, -1], False),
])
def test_class_counts_are_a_non_empty_list_of_non_negative_counts(counts, accepted):
    def make():
        return CCSAM(mlp(0).parameters(), torch.optim.SGD, class_counts=counts, lr=0.1)
    if accepted:
        assert make().counts.tolist() == [float(c) for c in torch.as_tensor(counts).tolist()]
    else:
        with pytest.raises(ValueError, match=r"^class_counts must be a non-empty sequence of non-negative "
                                             r"training-set counts$"):
            make()
