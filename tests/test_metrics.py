"""Metrics against hand-computed values."""

import json

import numpy as np
import pytest
import torch

from ft_focal.metrics import (
    ALEXNET_CLEAN_ERROR,
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    errors_from_accuracy_table,
    expected_calibration_error,
    load_alexnet_errors,
    long_tail_accuracy,
    mean_corruption_error,
    shot_groups,
)


def test_shot_group_boundaries():
    groups = shot_groups([101, 100, 20, 19, 0, 1000, 21, 99])
    assert list(groups) == ["many", "medium", "medium", "few", "few", "many", "medium", "medium"]
    assert list(shot_groups([11, 10, 9], many=10, few=10)) == ["many", "medium", "few"]


def test_long_tail_accuracy_by_hand():
    counts = [200, 50, 5, 150, 30]      # many, medium, few, many, medium
    labels = [0, 0, 0, 0, 1, 1, 2]      # classes 3 and 4 have no test samples
    preds = [0, 0, 0, 1, 1, 0, 0]       # class 0: 3/4, class 1: 1/2, class 2: 0/1
    res = long_tail_accuracy(preds, labels, counts)
    assert res["overall"] == pytest.approx(4 / 7)
    assert res["many"] == pytest.approx(0.75)      # class 3 has no test samples: left out
    assert res["medium"] == pytest.approx(0.5)
    assert res["few"] == pytest.approx(0.0)
    assert res["per_class"] == [0.75, 0.5, 0.0, None, None]
    assert res["mean_per_class"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert res["num_samples"] == 7
    assert res["group_num_classes"] == {"many": 1, "medium": 1, "few": 1}
    json.dumps(res)

    # logits (torch) give the same result via argmax
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 5).float()
    assert long_tail_accuracy(logits, torch.tensor(labels), counts) == res


def test_group_accuracy_is_mean_of_class_accuracies():
    # class 0: 10 samples all right, class 1: 1 sample wrong, both "few"
    labels = [0] * 10 + [1]
    preds = [0] * 10 + [0]
    res = long_tail_accuracy(preds, labels, [5, 5])
    assert res["few"] == pytest.approx(0.5)          # not 10/11
    assert res["overall"] == pytest.approx(10 / 11)
    assert res["many"] is None and res["medium"] is None
    json.dumps(res)


def test_long_tail_accuracy_errors():
    with pytest.raises(ValueError, match="labels"):
        long_tail_accuracy([0, 1], [0, 3], [5, 5])
    with pytest.raises(ValueError):
        long_tail_accuracy(np.zeros((2, 3)), [0, 1], [5, 5])
    with pytest.raises(ValueError):
        long_tail_accuracy([0, 1], [0, 1], [5, 5], num_classes=3)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4]])
    labels = [0, 1]
    # bins of width 0.1: |1 - 0.9| * 1/2 + |0 - 0.6| * 1/2
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.35)
    assert expected_calibration_error(np.log(probs), labels, n_bins=10,
                                      inputs="logits") == pytest.approx(0.35)
    # one bin: |acc - mean conf| = |0.5 - 0.75|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.25)
    # perfectly confident and right -> 0
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0)


def test_alexnet_table():
    table = load_alexnet_errors()
    assert list(table) == list(BENCHMARK_CORRUPTIONS)
    assert len(BENCHMARK_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert table["gaussian_noise"] == [0.69528, 0.82542, 0.93554, 0.98138, 0.99452]
    # means over severities published in Hendrycks' ImageNet-C repository
    published = {"gaussian_noise": 0.886428, "brightness": 0.564592, "jpeg_compression": 0.606500,
                 "elastic_transform": 0.646056, "contrast": 0.853204}
    for name, mean in published.items():
        assert np.mean(table[name]) == pytest.approx(mean, abs=1e-9)
    table["fog"][0] = 0.0  # returned copy: must not alter the cached table
    assert load_alexnet_errors()["fog"][0] == 0.67474


def test_mce_two_corruption_toy_table():
    errors = {"gaussian_noise": [0.1, 0.2, 0.3, 0.4, 0.5], "fog": [0.3] * 5}
    base = {"gaussian_noise": [0.2, 0.4, 0.6, 0.8, 1.0], "fog": [0.4] * 5}
    res = mean_corruption_error(errors, baseline=base, clean_error=0.05, baseline_clean_error=0.1)
    # CE: 1.5 / 3.0 = 50 %, 1.5 / 2.0 = 75 %
    assert res["CE"] == pytest.approx({"gaussian_noise": 50.0, "fog": 75.0})
    assert res["mCE"] == pytest.approx(62.5)
    # relative: (1.5 - 5*0.05) / (3.0 - 5*0.1) = 1.25/2.5; (1.5 - 0.25) / (2.0 - 0.5) = 1.25/1.5
    assert res["relative_CE"] == pytest.approx({"gaussian_noise": 50.0, "fog": 250 / 3})
    assert res["relative_mCE"] == pytest.approx((50.0 + 250 / 3) / 2)
    assert res["mCE_complete"] is False
    assert len(res["missing"]) == 13 and "fog" not in res["missing"]
    assert res["mean_error"]["fog"] == pytest.approx(30.0)
    json.dumps(res)
    # relative needs the baseline's clean error for a custom baseline
    with pytest.raises(ValueError, match="baseline_clean_error"):
        mean_corruption_error(errors, baseline=base, clean_error=0.05)
    assert "relative_mCE" not in mean_corruption_error(errors, baseline=base)


def test_mce_against_alexnet_by_hand():
    errors = {"gaussian_noise": [0.5] * 5, "speckle_noise": [0.4] * 5}
    res = mean_corruption_error(errors, clean_error=0.2)
    alex_sum = 0.69528 + 0.82542 + 0.93554 + 0.98138 + 0.99452   # 4.43214
    assert res["CE"]["gaussian_noise"] == pytest.approx(100 * 2.5 / alex_sum)
    assert res["mCE"] == pytest.approx(100 * 2.5 / alex_sum)
    assert res["relative_CE"]["gaussian_noise"] == pytest.approx(
        100 * (2.5 - 1.0) / (alex_sum - 5 * 0.4348))
    assert ALEXNET_CLEAN_ERROR == 0.4348
    # extra corruption: no AlexNet value -> reported as mean error only, never in mCE
    assert res["extra_CE"] == {} and res["no_baseline"] == ["speckle_noise"]
    assert res["mean_error"]["speckle_noise"] == pytest.approx(40.0)

    full = {c: [0.5] * 5 for c in BENCHMARK_CORRUPTIONS}
    res = mean_corruption_error(full)
    assert res["mCE_complete"] is True and res["missing"] == []
    table = load_alexnet_errors()
    assert res["mCE"] == pytest.approx(np.mean([250 / sum(table[c]) for c in table]))


def test_mce_extra_with_custom_baseline():
    errors = {"fog": [0.2] * 5, "spatter": [0.3] * 5}
    base = {"fog": [0.4] * 5, "spatter": [0.6] * 5}
    res = mean_corruption_error(errors, baseline=base)
    assert res["CE"] == pytest.approx({"fog": 50.0})
    assert res["mCE"] == pytest.approx(50.0)           # spatter not in mCE
    assert res["extra_CE"] == pytest.approx({"spatter": 50.0})


def test_mce_validation_names_corruption():
    with pytest.raises(ValueError, match="fog"):
        mean_corruption_error({"fog": [0.1, 0.2, 1.2, 0.3, 0.3]})
    with pytest.raises(ValueError, match="snow"):
        mean_corruption_error({"snow": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(ValueError, match="fog"):
        mean_corruption_error({"fog": [0.1, 0.2, float("nan"), 0.3, 0.3]})
    with pytest.raises(ValueError, match="baseline"):
        mean_corruption_error({"fog": [0.1] * 5}, baseline="resnet")
    with pytest.raises(ValueError, match="clean_error"):
        mean_corruption_error({"fog": [0.1] * 5}, clean_error=5.0)


def test_errors_from_accuracy_table():
    out = errors_from_accuracy_table({"fog": [0.9, 0.8, 0.7, 0.6, 0.5],
                                      "snow": {"1": 0.5, "2": 0.4, "3": 0.3, "4": 0.2, "5": 0.1}})
    assert out["fog"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert out["snow"] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    with pytest.raises(ValueError, match="snow"):
        errors_from_accuracy_table({"snow": {1: 0.5, 2: 0.4}})
