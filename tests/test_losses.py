"""Per-sample losses against values computed independently with numpy / by hand."""

import math

import numpy as np
import pytest
import torch

from ft_focal.losses import (
    LOSS_NAMES,
    build_loss,
    class_balanced_weights,
    loss_kwargs,
)

COUNTS = [100, 10, 1]
LOGITS = np.array([[2.0, 0.5, -1.0],
                   [0.1, 0.2, 0.3],
                   [-0.5, 1.5, 0.0],
                   [1.0, 1.0, 1.0]])
LABELS = np.array([0, 2, 1, 2])


def _np_ce(z, y):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _call(loss, logits=LOGITS, labels=LABELS, dtype=torch.float64):
    out = loss(torch.tensor(logits, dtype=dtype), torch.tensor(labels))
    assert out.shape == (len(labels),)
    assert out.dtype == dtype
    return out.detach().numpy()


def test_ce_by_hand():
    # sample 4: uniform logits over 3 classes -> CE = log 3
    out = _call(build_loss("ce", COUNTS))
    assert out[3] == pytest.approx(math.log(3.0), rel=1e-12)
    # sample 1: -log(e^2 / (e^2 + e^0.5 + e^-1))
    assert out[0] == pytest.approx(-2.0 + math.log(math.exp(2) + math.exp(0.5) + math.exp(-1)))
    np.testing.assert_allclose(out, _np_ce(LOGITS, LABELS), rtol=1e-12)


def test_class_balanced_weights_by_hand():
    beta = 0.9999
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in COUNTS])
    expected = raw / raw.sum() * 3
    np.testing.assert_allclose(class_balanced_weights(COUNTS, beta), expected, rtol=1e-12)
    assert class_balanced_weights(COUNTS, beta).sum() == pytest.approx(3.0)
    # class with one sample: raw weight exactly 1
    assert raw[2] == pytest.approx(1.0)
    out = _call(build_loss("cb_ce", COUNTS))
    np.testing.assert_allclose(out, expected[LABELS] * _np_ce(LOGITS, LABELS), rtol=1e-12)


def test_logit_adjusted_and_balanced_softmax():
    prior = np.array(COUNTS) / 111.0
    for tau in (1.0, 0.5):
        out = _call(build_loss("la", COUNTS, tau=tau))
        np.testing.assert_allclose(out, _np_ce(LOGITS + tau * np.log(prior), LABELS), rtol=1e-12)
    bs = _call(build_loss("balanced_softmax", COUNTS))
    # balanced softmax: CE(z + log n_c) -- a constant shift of LA with tau 1
    np.testing.assert_allclose(bs, _np_ce(LOGITS + np.log(np.array(COUNTS, float)), LABELS),
                               rtol=1e-12)
    np.testing.assert_allclose(bs, _call(build_loss("logit_adjusted", COUNTS)), rtol=1e-12)
    # hand value for sample 4: uniform logits -> -log(pi_2) softmax => -log(1/111) weight
    assert bs[3] == pytest.approx(-math.log(1 / 111.0))


def test_ldam_margins_and_drw():
    # m_c = n_c^(-1/4), scaled so that the max (class with 1 sample) is 0.5
    m = 0.5 * np.array([100 ** -0.25, 10 ** -0.25, 1.0])
    assert m[0] == pytest.approx(0.5 / math.sqrt(10))
    s = 30.0
    z = LOGITS.copy()
    z[np.arange(4), LABELS] -= m[LABELS]
    expected = _np_ce(s * z, LABELS)
    np.testing.assert_allclose(_call(build_loss("ldam", COUNTS)), expected, rtol=1e-10)

    loss = build_loss("ldam_drw", COUNTS, drw_epoch=3)
    for epoch in (0, 2):
        loss.set_epoch(epoch)
        np.testing.assert_allclose(_call(loss), expected, rtol=1e-10)
    loss.set_epoch(3)
    w = np.array([(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS])
    w = w / w.sum() * 3
    np.testing.assert_allclose(_call(loss), w[LABELS] * expected, rtol=1e-10)


def test_vs_formula_matches_official():
    gamma, tau = 0.2, 1.5
    n = np.array(COUNTS, float)
    # official code: temp = (1/n)^gamma / min((1/n)^gamma); output = x / temp + tau * log(pi)
    temp = (1.0 / n) ** gamma
    delta = temp / temp.min()
    np.testing.assert_allclose(delta, (n.max() / n) ** gamma)
    expected = _np_ce(LOGITS / delta + tau * np.log(n / n.sum()), LABELS)
    out = _call(build_loss("vs", COUNTS, gamma=gamma, tau=tau))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # paper's multiplicative form: logits * (n_c / n_max)^gamma
    expected2 = _np_ce(LOGITS * (n / n.max()) ** gamma + tau * np.log(n / n.sum()), LABELS)
    np.testing.assert_allclose(out, expected2, rtol=1e-12)
    # defaults from docs/algorithms.md
    assert loss_kwargs("vs") == {"gamma": 0.05, "tau": 0.75}


def test_focal_by_hand():
    ce = _np_ce(LOGITS, LABELS)
    p = np.exp(-ce)
    out = _call(build_loss("focal", COUNTS, gamma=2.0))
    np.testing.assert_allclose(out, (1 - p) ** 2 * ce, rtol=1e-10)
    # uniform logits: p = 1/3 -> (2/3)^2 log 3
    assert out[3] == pytest.approx((2 / 3) ** 2 * math.log(3))
    np.testing.assert_allclose(_call(build_loss("focal", COUNTS, gamma=0.0)), ce, rtol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_losses_shape_dtype_grad_and_empty_class(name):
    counts = [50, 0, 5, 1]  # class 1 has no training samples
    loss = build_loss(name, counts)
    loss.set_epoch(1000)
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(6, 4, dtype=dtype, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        y = torch.tensor([0, 1, 2, 3, 1, 0])
        out = loss(z, y)
        assert out.shape == (6,) and out.dtype == dtype
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(z.grad).all()


def test_empty_class_does_not_change_others():
    # the empty class is only a phantom: weights / margins of real classes are unchanged
    w_full = class_balanced_weights([100, 10])
    w_empty = class_balanced_weights([100, 0, 10])
    np.testing.assert_allclose(w_empty[[0, 2]], w_full, rtol=1e-12)
    m_full = build_loss("ldam", [100, 10]).margins.numpy()
    m_empty = build_loss("ldam", [100, 0, 10]).margins.numpy()
    np.testing.assert_allclose(m_empty[[0, 2]], m_full, rtol=1e-12)
    assert m_empty[1] == pytest.approx(0.5)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*ldam_drw"):
        build_loss("nope", COUNTS)
    with pytest.raises(ValueError, match="taux.*tau"):
        build_loss("la", COUNTS, taux=1.0)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_kwargs("nope")
    assert set(loss_kwargs("ldam_drw")) == {"max_m", "s", "drw_epoch", "beta"}
    with pytest.raises(ValueError):
        build_loss("ce", [0, 0])
    with pytest.raises(ValueError):
        build_loss("ce", [3, -1])
    with pytest.raises(ValueError, match="logits must have shape"):
        build_loss("ce", COUNTS)(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_buffers_follow_module_and_logits():
    loss = build_loss("vs", COUNTS)
    names = {n for n, _ in loss.named_buffers()}
    assert {"delta", "log_prior"} <= names
    state = loss.state_dict()
    assert "delta" in state
