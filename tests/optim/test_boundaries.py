"""Boundaries pinned where an off-by-one would hide: each test cites where its value comes from.

- ImbSAM / SSE-SAM tail: ``n_c < tail_threshold`` (docs/algorithms.md; ImbSAM's and SSE-SAM's
  official code split classes with ``cls_num < threshold``), so a class AT the threshold is head.
- Shot groups: many ``n > 100``, few ``n < 20``, medium otherwise, so 100 and 20 are medium
  (docs/metrics.md; Decoupling's / LIFT's ``shot_acc``).
- EvalConfig defaults: the thresholds above, selection on val, test on test (docs/metrics.md).
- SAM with a zero gradient: eps = rho g / (||g|| + 1e-12) (docs/algorithms.md) is 0, not NaN.
- AlexNet ImageNet-C errors: the 15 per-corruption means of Hendrycks & Dietterich (2019), as in
  AugMix's ``ALEXNET_ERR`` (the mCE normaliser, docs/metrics.md).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_optim_reference import RefSGD, batch, max_diff, mlp, ref_imbsam, ref_run, ref_ssesam, run, weights  # noqa: E402 (after the sys.path entry it needs)

from ft_focal.config import EvalConfig  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.metrics import BENCHMARK_CORRUPTIONS, load_alexnet_errors, shot_groups  # noqa: E402 (after the sys.path entry it needs)
from ft_focal.optim import SAM, SSESAM, ImbSAM  # noqa: E402 (after the sys.path entry it needs)

# class 0 sits ON the threshold (head), class 1 one below (tail); labels of batch(): 0 0 0 1 1 2 3 3 0 1 2 0
COUNTS_AT_20 = [20, 19, 300, 50]
COUNTS_AT_100 = [100, 99, 300, 50]
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("one_backward", [False, True])
def test_imbsam_class_at_the_tail_threshold_is_head(one_backward):
    model, (x, y) = mlp().double(), batch()
    w = weights(model)
    opt = ImbSAM(list(model.parameters()), torch.optim.SGD, rho=0.05, class_counts=COUNTS_AT_20,
                 tail_threshold=20, tail_weight=2.0, model=model, one_backward=one_backward, **SGD)
    run(opt, model, x, y, steps=2)
    want = ref_run(model, w, x, y, lambda v: ref_imbsam(model, v, x, y, 0.05, COUNTS_AT_20, thr=20, tw=2.0),
                   RefSGD(**SGD), steps=2)
    assert max_diff(model, want) < 1e-10
    # and the step is not the one with class 0 in the tail (the boundary matters on this batch)
    wrong = ref_run(model, w, x, y, lambda v: ref_imbsam(model, v, x, y, 0.05, COUNTS_AT_20, thr=21, tw=2.0),
                    RefSGD(**SGD), steps=2)
    assert max_diff(model, wrong) > 1e-4


@pytest.mark.parametrize("switched", [False, True])
def test_sse_sam_class_at_the_tail_threshold_is_head(switched):
    model, (x, y) = mlp().double(), batch()
    w = weights(model)
    opt = SSESAM(list(model.parameters()), torch.optim.SGD, rho_head=0.05, rho_tail=0.1,
                 class_counts=COUNTS_AT_100, tail_threshold=100, switch_fraction=0.5, **SGD)
    opt.set_epoch(5 if switched else 0, 10)   # epoch 5 of 10 = 0.5 x 10: the first epoch of stage 2
    run(opt, model, x, y)
    want = ref_run(model, w, x, y, lambda v: ref_ssesam(model, v, x, y, 0.05, 0.1, COUNTS_AT_100, 100, switched),
                   RefSGD(**SGD))
    assert max_diff(model, want) < 1e-10
    wrong = ref_run(model, w, x, y, lambda v: ref_ssesam(model, v, x, y, 0.05, 0.1, COUNTS_AT_100, 101, switched),
                    RefSGD(**SGD))
    assert max_diff(model, wrong) > 1e-4


def test_shot_groups_at_100_and_20_are_medium():
    assert list(shot_groups([101, 100, 99, 21, 20, 19])) == ["many", "medium", "medium", "medium", "medium", "few"]


def test_eval_config_defaults():
    cfg = EvalConfig()
    assert (cfg.many_threshold, cfg.few_threshold) == (100, 20)
    assert (cfg.select_split, cfg.select_metric, cfg.test_split, cfg.five_crop, cfg.ece_bins) == \
        ("val", "overall", "test", False, 15)


def test_sam_with_a_zero_gradient_takes_the_plain_step():
    """g = 0: eps = rho * 0 / (0 + 1e-12) = 0, so the update is the base step at w (no NaN, no skip)."""
    model, (x, y) = mlp().double(), batch()
    w = weights(model)
    opt = SAM(list(model.parameters()), torch.optim.SGD, rho=0.05, **SGD)
    opt.step(lambda: 0.0 * model(x).sum(dim=1), targets=y)   # every gradient exactly 0
    zero = {k: torch.zeros_like(v) for k, v in w.items()}
    assert opt.skipped_steps == 0
    assert max_diff(model, RefSGD(**SGD).step(w, zero)) == 0.0
    # a tiny gradient is scaled by 1 / (||g|| + 1e-12), not by 1 / ||g||: with ||g|| = 1e-14 the
    # perturbation is rho * 1e-14 / 1.01e-12 of g's direction, ~ 1 % of rho
    model2 = mlp().double()
    opt2 = SAM(list(model2.parameters()), torch.optim.SGD, rho=0.05, lr=0.0)
    seen = []
    last = list(model2.parameters())[-1]

    def closure():
        seen.append(last.detach().clone())
        return 1e-14 * (model2[-1].bias * torch.ones(len(y), 1, dtype=torch.float64))[:, 0]
    opt2.step(closure, targets=y)
    g_norm = 1e-14   # only bias[0] gets a gradient: d/d b0 of mean(1e-14 b0) = 1e-14
    assert float((seen[1] - seen[0])[0]) == pytest.approx(0.05 * g_norm / (g_norm + 1e-12), rel=1e-6)


# Hendrycks & Dietterich (2019), Table 1 / AugMix's ALEXNET_ERR, in %, BENCHMARK_CORRUPTIONS order.
ALEXNET_MEAN_ERROR = {
    "gaussian_noise": 88.6, "shot_noise": 89.4, "impulse_noise": 92.3, "defocus_blur": 82.0, "glass_blur": 82.6,
    "motion_blur": 78.6, "zoom_blur": 79.8, "snow": 86.7, "frost": 82.7, "fog": 81.9, "brightness": 56.5,
    "contrast": 85.3, "elastic_transform": 64.6, "pixelate": 71.8, "jpeg_compression": 60.7,
}


def test_all_15_alexnet_means_match_the_published_ones():
    table = load_alexnet_errors()
    assert list(table) == list(BENCHMARK_CORRUPTIONS) == list(ALEXNET_MEAN_ERROR)
    for name, published in ALEXNET_MEAN_ERROR.items():
        mean = 100 * sum(table[name]) / 5
        # +-0.05: the published means are rounded to 0.1 (jpeg's mean of the table is 60.65)
        assert abs(mean - published) <= 0.05 + 1e-9, (name, mean, published)


def test_shot_groups_refuses_few_above_many_naming_both():
    """Mutation testing (tools/mutation.py metrics) found this message unchecked."""
    with pytest.raises(ValueError, match=r"few threshold \(200\) must not exceed many threshold \(100\)"):
        shot_groups([5, 50], many=100, few=200)


@pytest.mark.parametrize("clean", [0.0, 1.0])
def test_clean_error_accepts_the_ends_of_0_1_and_refuses_beyond(clean):
    """docs/metrics.md: clean errors are fractions in [0, 1], both ends included (mutation testing
    found the ends unchecked)."""
    from ft_focal.metrics import mean_corruption_error

    errors = {c: [0.5] * 5 for c in BENCHMARK_CORRUPTIONS}
    mean_corruption_error(errors, clean_error=clean)
    with pytest.raises(ValueError, match=r"clean_error must be a fraction in \[0, 1\]"):
        mean_corruption_error(errors, clean_error={0.0: -0.01, 1.0: 1.5}[clean])
