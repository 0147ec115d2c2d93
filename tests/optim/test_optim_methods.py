"""Every optimizer against an independent reference computation (float64, 1e-8)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_reference import (  # noqa: E402 (after the sys.path entry it needs)
    RefSGD,
    axpy,
    batch,
    load,
    max_diff,
    mlp,
    ref_ccsam_classifier,
    ref_ccsam_network,
    ref_erm,
    ref_focal,
    ref_imbsam,
    ref_run,
    ref_sam,
    ref_ssesam,
    run,
    scal,
    weights,
)

from ft_focal.optim import CCSAM, ERM, SAM, SSESAM, FocalSAM, ImbSAM  # noqa: E402 (after the sys.path entry it needs)

TOL = 1e-8
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
COUNTS = [100, 30, 8, 3]


def check(make_opt, gfn, steps=2, sgd=SGD, seed=0, labels=None):
    model = mlp(seed)
    x, y = batch() if labels is None else batch(labels=labels, n=len(labels))
    w0 = weights(model)
    opt = make_opt(model)
    run(opt, model, x, y, steps)
    ref = ref_run(model, w0, x, y, lambda w: gfn(model, w, x, y), RefSGD(**sgd), steps)
    assert max_diff(model, ref) < TOL
    return opt


def test_erm_matches_sgd():
    check(lambda m: ERM(m.parameters(), torch.optim.SGD, **SGD), ref_erm)
    nest = dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True)
    check(lambda m: ERM(m.parameters(), torch.optim.SGD, **nest), ref_erm, sgd=nest)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam(rho):
    opt = check(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=rho, **SGD),
                lambda m, w, x, y: ref_sam(m, w, x, y, rho))
    assert opt.last_pass_counts == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam(eta):
    check(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, eta=eta, **SGD),
          lambda m, w, x, y: ref_sam(m, w, x, y, 1.0, adaptive=True, eta=eta))


@pytest.mark.parametrize("rho,gamma,lam,counts", [
    (0.05, 0.5, 0.8, COUNTS), (0.2, 3.0, 0.5, [5000, 645, 50, 7]), (0.1, 1.5, 1.1, [10, 10, 10, 10])])
def test_focal_sam(rho, gamma, lam, counts):
    opt = check(lambda m: FocalSAM(m.parameters(), torch.optim.SGD, rho=rho, gamma=gamma, lam=lam,
                                   class_counts=counts, **SGD),
                lambda m, w, x, y: ref_focal(m, w, x, y, rho, gamma, lam, counts))
    assert opt.last_pass_counts == {"forward": 2, "backward": 3}
    assert opt.pass_counts == {"forward": 4, "backward": 6}


def test_focal_sam_identities():
    # lam = 0: plain SGD
    check(lambda m: FocalSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=2.0, lam=0.0,
                             class_counts=COUNTS, **SGD), ref_erm)
    # gamma = 0, lam = 1: exactly SAM (against the SAM optimizer itself, too)
    check(lambda m: FocalSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, lam=1.0,
                             class_counts=COUNTS, **SGD), lambda m, w, x, y: ref_sam(m, w, x, y, 0.1))
    m1, m2 = mlp(3), mlp(3)
    x, y = batch()
    run(FocalSAM(m1.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, lam=1.0, class_counts=COUNTS, **SGD),
        m1, x, y, 2)
    run(SAM(m2.parameters(), torch.optim.SGD, rho=0.1, **SGD), m2, x, y, 2)
    assert max_diff(m1, weights(m2)) < 1e-12

    # gamma = 0: (1 - lam) grad L(w) + lam grad L(w + eps)
    def mix(m, w, x, y, lam=0.6, rho=0.1):
        return axpy(scal(ref_erm(m, w, x, y), 1 - lam), scal(ref_sam(m, w, x, y, rho), lam))
    check(lambda m: FocalSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, lam=0.6,
                             class_counts=COUNTS, **SGD), mix)


@pytest.mark.parametrize("tw", [1.0, 2.0])
@pytest.mark.parametrize("thr,rho", [(20, 0.05), (50, 0.3)])
def test_imbsam(tw, thr, rho):
    opt = check(lambda m: ImbSAM(m.parameters(), torch.optim.SGD, rho=rho, class_counts=COUNTS,
                                 tail_threshold=thr, tail_weight=tw, **SGD),
                lambda m, w, x, y: ref_imbsam(m, w, x, y, rho, COUNTS, thr, tw))
    assert opt.last_pass_counts == {"forward": 2, "backward": 3}


def test_imbsam_tail_weight_matters_and_no_tail_batch():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    run(ImbSAM(m1.parameters(), torch.optim.SGD, rho=0.1, class_counts=COUNTS, tail_weight=1.0, lr=0.1), m1, x, y)
    run(ImbSAM(m2.parameters(), torch.optim.SGD, rho=0.1, class_counts=COUNTS, tail_weight=2.0, lr=0.1), m2, x, y)
    assert max_diff(m1, weights(m2)) > 1e-6
    # a batch of head classes only: no perturbation, 1F + 1B, the update is SGD on the head loss
    labels = (0, 0, 1, 1, 0, 1)
    opt = check(lambda m: ImbSAM(m.parameters(), torch.optim.SGD, rho=0.1, class_counts=COUNTS, **SGD),
                ref_erm, labels=labels)
    assert opt.last_pass_counts == {"forward": 1, "backward": 1}
    # tail only
    opt = check(lambda m: ImbSAM(m.parameters(), torch.optim.SGD, rho=0.1, class_counts=COUNTS, **SGD),
                lambda m, w, x, y: ref_sam(m, w, x, y, 0.1), labels=(2, 3, 3, 2))
    assert opt.last_pass_counts == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("scope", ["network", "classifier"])
@pytest.mark.parametrize("flat", [0.3, 0.8])
def test_ccsam(scope, flat):
    counts = [100, 30, 1, 3]     # class 2 has ONE training sample: (n_c - 1) guarded to 1
    head = ["2.weight", "2.bias"]
    rho = 0.02 if scope == "network" else 0.05

    def make(m):
        return CCSAM(m.parameters(), torch.optim.SGD, class_counts=counts, scope=scope, rho=rho,
                     classifier_params=list(m[2].parameters()), flat_ratio=flat, **SGD)

    if scope == "network":
        gfn = lambda m, w, x, y: ref_ccsam_network(m, w, x, y, counts, rho, flat)  # noqa: E731 (a one-line closure reads better than a def here)
    else:
        gfn = lambda m, w, x, y: ref_ccsam_classifier(m, w, x, y, counts, rho, flat, head)  # noqa: E731 (a one-line closure reads better than a def here)
    opt = check(make, gfn)
    k = 4   # classes in the batch
    assert opt.last_pass_counts == {"forward": 1 + k, "backward": (k if scope == "network" else k + 1) + k}


def test_ccsam_defaults():
    m = mlp()
    assert CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, lr=0.1).rho == 1.0
    opt = CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, scope="classifier",
                classifier_params=list(m[2].parameters()), lr=0.1)
    assert opt.rho == 1e-6
    with pytest.raises(ValueError, match="classifier_params"):
        CCSAM(m.parameters(), torch.optim.SGD, class_counts=COUNTS, scope="classifier", lr=0.1)


@pytest.mark.parametrize("epoch,switched", [(0, False), (6, False), (7, True), (9, True)])
def test_ssesam(epoch, switched):
    thr = 40   # tail: classes 2, 3 (and 1 with 30 samples)

    def make(m):
        opt = SSESAM(m.parameters(), torch.optim.SGD, rho_head=0.05, rho_tail=0.2, class_counts=COUNTS,
                     tail_threshold=thr, switch_fraction=0.7, **SGD)
        opt.set_epoch(epoch, 10)
        return opt

    opt = check(make, lambda m, w, x, y: ref_ssesam(m, w, x, y, 0.05, 0.2, COUNTS, thr, switched))
    assert opt.switched == switched
    expect = {"forward": 2, "backward": 3} if switched else {"forward": 3, "backward": 4}
    assert opt.last_pass_counts == expect


def test_ssesam_empty_group_and_no_epoch():
    # no tail sample in the batch: head perturbed only, exactly one base step
    opt = check(lambda m: SSESAM(m.parameters(), torch.optim.SGD, rho_head=0.1, rho_tail=0.3,
                                 class_counts=COUNTS, tail_threshold=20, **SGD),
                lambda m, w, x, y: ref_sam(m, w, x, y, 0.1), labels=(0, 1, 1, 0, 0))
    assert opt.last_pass_counts == {"forward": 2, "backward": 2}
    assert not opt.switched   # set_epoch never called: stage 1


def test_adamw_base():
    m1, m2 = mlp(), mlp()
    x, y = batch()
    opt = FocalSAM(m1.parameters(), torch.optim.AdamW, rho=0.1, gamma=1.0, lam=0.8, class_counts=COUNTS,
                   lr=1e-2, weight_decay=1e-2)
    run(opt, m1, x, y, 2)
    base = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=1e-2)
    w = weights(m2)
    for _ in range(2):
        g = ref_focal(m2, weights(m2), x, y, 0.1, 1.0, 0.8, COUNTS)
        for n, p in m2.named_parameters():
            p.grad = g[n]
        base.step()
    assert max_diff(m1, weights(m2)) < TOL and max_diff(m1, w) > 1e-4
    load(m2, w)
