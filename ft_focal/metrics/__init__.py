"""Evaluation metrics: long-tail accuracy by shot group, calibration, ImageNet-C CE / mCE.

Plain numbers in, plain (JSON-serialisable) numbers out; accepts numpy arrays or torch tensors.
Imports nothing else from ft_focal.

Units: accuracies and the calibration error are FRACTIONS in [0, 1]; corruption errors (CE, mCE,
relative CE / mCE, mean errors) are PERCENT, as in Hendrycks & Dietterich (2019).
"""

from .accuracy import expected_calibration_error, long_tail_accuracy, shot_groups
from .corruption import (
    ALEXNET_CLEAN_ERROR,
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    describe_mce,
    errors_from_accuracy_table,
    imagenet_classes,
    load_alexnet_errors,
    mce_name,
    mean_corruption_error,
)

__all__ = [
    "shot_groups",
    "long_tail_accuracy",
    "expected_calibration_error",
    "load_alexnet_errors",
    "mce_name",
    "describe_mce",
    "imagenet_classes",
    "BENCHMARK_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "ALEXNET_CLEAN_ERROR",
    "mean_corruption_error",
    "errors_from_accuracy_table",
]
