"""Each loss's published defaults, its keywords reaching it by name, and its input checks, each against
a hand computation (numpy) or the exact one-line message. Sources of the defaults: the docstrings of
ft_focal/losses/long_tail.py and docs/algorithms.md ("Losses"): LDAM max_m = 0.5, s = 30 and DRW from epoch 160
(Cao et al. 2019); class-balanced beta = 0.9999 (Cui et al. 2019); logit adjustment tau = 1 (Menon et
al. 2021); VS gamma = 0.05, tau = 0.75; focal gamma = 2 (Lin et al. 2017)."""

import numpy as np
import pytest
import torch

from ft_focal.losses import (
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    VSLoss,
    build_loss,
    class_balanced_weights,
    loss_kwargs,
)

# No class with one sample: LDAM's largest margin is then n_min^(-1/4) != 1, so its scaling shows.
COUNTS = [400, 81, 16, 16]
LOGITS = np.array([[2.0, 0.5, -1.0, 0.3],
                   [0.1, 0.2, 0.3, -0.2],
                   [-0.5, 1.5, 0.0, 0.9],
                   [1.0, 1.0, 1.0, 1.0],
                   [0.7, -0.3, 2.2, 0.0]])
LABELS = np.array([0, 2, 1, 3, 2])


def _ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _cb_weights(counts: list, beta: float) -> np.ndarray:
    w = (1 - beta) / (1 - beta ** np.asarray(counts, dtype=np.float64))
    return w / w.sum() * len(counts)


def _ldam(z: np.ndarray, y: np.ndarray, counts: list, max_m: float, s: float) -> np.ndarray:
    m = np.asarray(counts, dtype=np.float64) ** -0.25
    m = m * (max_m / m.max())
    return _ce(s * (z - m[y][:, None] * np.eye(z.shape[1])[y]), y)


def _log_prior(counts: list) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    return np.log(n / n.sum())


def _vs(z: np.ndarray, y: np.ndarray, counts: list, gamma: float, tau: float) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    return _ce(z / (n.max() / n) ** gamma + tau * _log_prior(counts), y)


def _focal(z: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    ce = _ce(z, y)
    return (1 - np.exp(-ce)) ** gamma * ce


def _run(loss, logits: np.ndarray = LOGITS, labels: np.ndarray = LABELS) -> np.ndarray:
    return loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)).detach().numpy()


HAND_DEFAULTS = {
    "cb_ce": lambda z, y: _cb_weights(COUNTS, 0.9999)[y] * _ce(z, y),
    "la": lambda z, y: _ce(z + _log_prior(COUNTS), y),
    "ldam": lambda z, y: _ldam(z, y, COUNTS, 0.5, 30.0),
    "vs": lambda z, y: _vs(z, y, COUNTS, 0.05, 0.75),
    "focal": lambda z, y: _focal(z, y, 2.0),
}


@pytest.mark.parametrize("name", sorted(HAND_DEFAULTS))
def test_a_loss_built_by_name_without_keywords_uses_its_published_defaults(name):
    np.testing.assert_allclose(_run(build_loss(name, COUNTS)), HAND_DEFAULTS[name](LOGITS, LABELS), rtol=1e-12)


def test_the_loss_classes_have_the_same_defaults_as_the_registry():
    np.testing.assert_allclose(_run(CrossEntropyLoss(COUNTS, class_balanced=True)), HAND_DEFAULTS["cb_ce"](LOGITS, LABELS),
                               rtol=1e-12)
    np.testing.assert_allclose(_run(LogitAdjustedLoss(COUNTS)), HAND_DEFAULTS["la"](LOGITS, LABELS), rtol=1e-12)
    np.testing.assert_allclose(_run(LDAMLoss(COUNTS)), HAND_DEFAULTS["ldam"](LOGITS, LABELS), rtol=1e-12)
    np.testing.assert_allclose(_run(VSLoss(COUNTS)), HAND_DEFAULTS["vs"](LOGITS, LABELS), rtol=1e-12)
    np.testing.assert_allclose(_run(FocalLoss(COUNTS)), HAND_DEFAULTS["focal"](LOGITS, LABELS), rtol=1e-12)
    assert loss_kwargs("ldam_drw") == {"max_m": 0.5, "s": 30.0, "drw_epoch": 160, "beta": 0.9999}


def test_ldam_drw_by_name_reweights_from_epoch_160_with_beta_0_9999():
    loss = build_loss("ldam_drw", COUNTS)
    plain = _ldam(LOGITS, LABELS, COUNTS, 0.5, 30.0)
    loss.set_epoch(159)
    np.testing.assert_allclose(_run(loss), plain, rtol=1e-12)
    loss.set_epoch(160)
    np.testing.assert_allclose(_run(loss), _cb_weights(COUNTS, 0.9999)[LABELS] * plain, rtol=1e-12)


@pytest.mark.parametrize("name, keywords, hand", [
    ("cb_ce", {"beta": 0.9}, lambda z, y: _cb_weights(COUNTS, 0.9)[y] * _ce(z, y)),
    ("la", {"tau": 0.5}, lambda z, y: _ce(z + 0.5 * _log_prior(COUNTS), y)),
    ("ldam", {"max_m": 0.3, "s": 10.0}, lambda z, y: _ldam(z, y, COUNTS, 0.3, 10.0)),
    ("vs", {"gamma": 0.2, "tau": 1.5}, lambda z, y: _vs(z, y, COUNTS, 0.2, 1.5)),
    ("focal", {"gamma": 1.0}, lambda z, y: _focal(z, y, 1.0)),
    ("focal", {"gamma": 0.5}, lambda z, y: _focal(z, y, 0.5)),
])
def test_every_keyword_given_by_name_reaches_the_loss(name, keywords, hand):
    np.testing.assert_allclose(_run(build_loss(name, COUNTS, **keywords)), hand(LOGITS, LABELS), rtol=1e-12)


def test_ldam_drw_keywords_given_by_name_reach_the_loss():
    loss = build_loss("ldam_drw", COUNTS, max_m=0.3, s=10.0, drw_epoch=2, beta=0.9)
    plain = _ldam(LOGITS, LABELS, COUNTS, 0.3, 10.0)
    loss.set_epoch(1)
    np.testing.assert_allclose(_run(loss), plain, rtol=1e-12)
    loss.set_epoch(2)
    np.testing.assert_allclose(_run(loss), _cb_weights(COUNTS, 0.9)[LABELS] * plain, rtol=1e-12)


def test_a_fresh_drw_loss_is_at_epoch_0_and_not_yet_reweighted():
    loss = LDAMLoss(COUNTS, drw_epoch=1)
    assert loss.epoch == 0 and not loss.reweighting_active
    np.testing.assert_allclose(_run(loss), _ldam(LOGITS, LABELS, COUNTS, 0.5, 30.0), rtol=1e-12)


def test_ldam_one_hot_has_every_class_when_the_batch_lacks_the_last_one():
    labels = np.array([0, 1, 0, 2, 1])   # class 3 absent: the margins still index [B, 4]
    np.testing.assert_allclose(_run(LDAMLoss(COUNTS), LOGITS, labels), _ldam(LOGITS, labels, COUNTS, 0.5, 30.0),
                               rtol=1e-12)


def test_ldam_with_zero_margin_is_scaled_cross_entropy():
    np.testing.assert_allclose(_run(LDAMLoss(COUNTS, max_m=0.0, s=2.0)), _ce(2.0 * LOGITS, LABELS), rtol=1e-12)


def test_class_counts_as_a_tensor_single_class_and_one_sample_are_accepted():
    np.testing.assert_allclose(_run(build_loss("la", torch.tensor(COUNTS))), HAND_DEFAULTS["la"](LOGITS, LABELS),
                               rtol=1e-12)
    one = np.array([[0.3], [-1.0]])
    np.testing.assert_allclose(_run(build_loss("ce", [5]), one, np.array([0, 0])), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(_run(build_loss("la", [1, 0]), LOGITS[:, :2], np.array([0, 1, 0, 1, 0])),
                               _ce(LOGITS[:, :2] + np.log([1.0, 1.0]), np.array([0, 1, 0, 1, 0])), rtol=1e-12)


@pytest.mark.parametrize("counts, message", [
    ([[1, 2], [3, 4]], r"^class_counts must be a non-empty 1-D sequence, got shape \(2, 2\)$"),
    ([], r"^class_counts must be a non-empty 1-D sequence, got shape \(0,\)$"),
    ([3, -1], r"^class_counts must be finite and non-negative$"),
    ([3, float("nan")], r"^class_counts must be finite and non-negative$"),
    ([0, 0], r"^class_counts must contain at least one training sample$"),
])
def test_unusable_class_counts_give_one_line_naming_what_is_wrong(counts, message):
    with pytest.raises(ValueError, match=message):
        build_loss("ce", counts)


def test_class_balanced_beta_is_checked_on_the_half_open_interval():
    uniform = class_balanced_weights(COUNTS, 0.0)
    assert uniform.shape == (4,) and uniform.dtype == np.float64 and (uniform == 1.0).all()
    np.testing.assert_allclose(class_balanced_weights(COUNTS, 0.5), _cb_weights(COUNTS, 0.5), rtol=1e-12)
    for beta in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^beta must be in \[0, 1\), got {beta}$"):
            class_balanced_weights(COUNTS, beta)


def test_negative_hyperparameters_give_one_line():
    with pytest.raises(ValueError, match=r"^max_m must be >= 0, got -0.1$"):
        LDAMLoss(COUNTS, max_m=-0.1)
    with pytest.raises(ValueError, match=r"^gamma must be >= 0, got -1.0$"):
        FocalLoss(COUNTS, gamma=-1.0)


def test_labels_of_the_wrong_shape_give_one_line_with_both_shapes():
    loss = build_loss("ce", COUNTS)
    logits = torch.tensor(LOGITS)
    with pytest.raises(ValueError, match=r"^labels must have shape \[5\], got \(5, 1\)$"):
        loss(logits, torch.tensor(LABELS)[:, None])
    with pytest.raises(ValueError, match=r"^labels must have shape \[5\], got \(3,\)$"):
        loss(logits, torch.tensor(LABELS[:3]))


def test_registry_messages_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"^unknown argument\(s\) beta, tau for loss 'ce'; valid: \(none\)$"):
        build_loss("ce", COUNTS, tau=1.0, beta=0.5)
    with pytest.raises(ValueError, match=r"^unknown argument\(s\) x for loss 'vs'; valid: gamma, tau$"):
        build_loss("vs", COUNTS, x=1)
    with pytest.raises(ValueError, match=r"^unknown loss 'nope'; valid losses: ce, cb_ce, la, logit_adjusted, "):
        build_loss("nope", COUNTS)
    with pytest.raises(ValueError, match=r"^unknown loss 'nope'; valid losses: ce, cb_ce, "):
        loss_kwargs("nope")
    with pytest.raises(ValueError, match=r"^loss 'la': argument tau must be finite, got inf$"):
        build_loss("la", COUNTS, tau=float("inf"))


def test_a_saved_loss_carries_its_class_counts_and_log_prior():
    state = build_loss("la", COUNTS).state_dict()
    np.testing.assert_array_equal(state["class_counts"].numpy(), COUNTS)
    np.testing.assert_allclose(state["log_prior"].numpy(), _log_prior(COUNTS), rtol=1e-12)
