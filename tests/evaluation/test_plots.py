"""Every plot writes a valid, non-trivial PNG."""

import pytest

from ft_focal.evaluation.plots import (
    plot_corruption_errors,
    plot_error_vs_severity,
    plot_group_accuracy,
    plot_per_class_accuracy,
    plot_sharpness,
    plot_trace_vs_count,
)
from ft_focal.metrics import BENCHMARK_CORRUPTIONS, long_tail_accuracy, mean_corruption_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COUNTS = [500, 300, 120, 100, 60, 20, 19, 5, 1, 0]


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def _lt_result(seed_shift=0):
    labels = [c for c in range(10) for _ in range(3)]
    preds = [(c + (i + seed_shift) % 3 // 2) % 10 for i, c in enumerate(labels)]
    return long_tail_accuracy(preds, labels, COUNTS)


def test_per_class_and_group_plots(tmp_path):
    res = _lt_result()
    per_class = res["per_class"]
    per_class[3] = None  # a class without test samples is skipped
    p = plot_per_class_accuracy(per_class, COUNTS, tmp_path / "sub" / "per_class.png")
    _check_png(p)
    _check_png(plot_group_accuracy({"erm": res}, tmp_path / "groups1.png"))
    other = dict(_lt_result(1), few=None)
    _check_png(plot_group_accuracy({"erm": res, "focal_sam": other}, tmp_path / "groups2.png"))
    with pytest.raises(ValueError):
        plot_per_class_accuracy([0.5], COUNTS, tmp_path / "bad.png")


def test_corruption_plots(tmp_path):
    errors = {c: [0.3 + 0.1 * s for s in range(5)] for c in BENCHMARK_CORRUPTIONS[:6]}
    errors["spatter"] = [0.2] * 5
    res = mean_corruption_error(errors, baseline={**errors, "spatter": [0.4] * 5})
    _check_png(plot_corruption_errors(res, tmp_path / "ce.png"))
    _check_png(plot_corruption_errors({"fog": 80.0, "snow": 95.0}, tmp_path / "ce_plain.png"))
    _check_png(plot_error_vs_severity(errors, tmp_path / "severity.png"))


def test_sharpness_plots(tmp_path):
    group_results = {
        "many": {"eigenvalues": [3.0], "trace": 20.0, "trace_stderr": 1.5,
                 "sam_sharpness": 0.01, "num_samples": 50},
        "medium": {"eigenvalues": [5.0], "trace": 35.0, "trace_stderr": None,
                   "sam_sharpness": 0.02, "num_samples": 20,
                   "per_class_trace": {"4": {"trace": 30.0, "trace_stderr": 2.0,
                                             "num_samples": 5}}},
        "few": {"eigenvalues": None, "trace": None, "trace_stderr": None,
                "sam_sharpness": None, "num_samples": 0},
    }
    _check_png(plot_sharpness(group_results, tmp_path / "sharp.png"))
    per_class = {0: 10.0, 1: 12.0, "5": {"trace": 40.0, "trace_stderr": 3.0}, 8: 80.0, 9: None}
    _check_png(plot_trace_vs_count(per_class, COUNTS, tmp_path / "trace.png"))
