"""ImageNet-C: corruption errors, CE / mCE and relative mCE against AlexNet (docs/metrics.md).

Corruption errors (CE, mCE, relative CE / mCE, mean errors) are PERCENT, as in Hendrycks & Dietterich
(2019); the per-severity errors they take are fractions.
"""

from __future__ import annotations

import csv
import io
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np

from .accuracy import _to_numpy

#: The 15 corruptions averaged in mCE, in the order of Hendrycks & Dietterich (2019).
BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out corruptions of ImageNet-C (reported, never part of mCE).
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
#: Clean top-1 error of AlexNet on ImageNet val (torchvision's AlexNet: 56.52 % accuracy).
ALEXNET_CLEAN_ERROR: float = 0.4348
NUM_SEVERITIES = 5


@lru_cache(maxsize=1)
def _alexnet_table() -> tuple[tuple[str, tuple[float, ...]], ...]:
    csv_file = resources.files("ft_focal").joinpath("resources").joinpath("alexnet_errors.csv")
    text = csv_file.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    if header[:1] != ["corruption"] or len(header) != 1 + NUM_SEVERITIES:
        raise ValueError(f"alexnet_errors.csv: unexpected header {header}")
    return tuple((r[0].strip(), tuple(float(v) for v in r[1:])) for r in body)


def load_alexnet_errors() -> dict[str, list[float]]:
    """AlexNet top-1 errors on ImageNet-C (fractions), corruption -> [severity 1..5].

    The 15 benchmark corruptions only (the mCE normaliser); read from the packaged
    ``ft_focal/resources/alexnet_errors.csv``. Returns a fresh copy.
    """
    return {name: list(vals) for name, vals in _alexnet_table()}


def _validate_errors(errors: Mapping[str, Sequence[float]], what: str) -> dict[str, np.ndarray]:
    if not isinstance(errors, Mapping):
        raise ValueError(
            f"{what} must map corruption name -> 5 errors, got {type(errors).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for name, vals in errors.items():
        arr = _to_numpy(vals).astype(np.float64).reshape(-1)
        if arr.size != NUM_SEVERITIES:
            raise ValueError(
                f"{what}: corruption {name!r} has {arr.size} values, expected {NUM_SEVERITIES} "
                "(severities 1..5)"
            )
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(
                f"{what}: corruption {name!r} has errors outside [0, 1] (fractions expected): "
                f"{arr.tolist()}"
            )
        out[str(name)] = arr
    return out


def _check_clean(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{what} must be a fraction in [0, 1], got {value}")
    return v


def _resolve_baseline(
    baseline: str | Mapping[str, Sequence[float]], baseline_clean_error: float | None
) -> tuple[dict[str, np.ndarray], float | None]:
    """Baseline errors per corruption and the baseline's clean error (unchecked)."""
    if isinstance(baseline, str):
        if baseline.lower() != "alexnet":
            raise ValueError(f"unknown baseline {baseline!r}; use 'alexnet' or a dict of errors")
        base = _validate_errors(load_alexnet_errors(), "alexnet table")
        return base, ALEXNET_CLEAN_ERROR if baseline_clean_error is None else baseline_clean_error
    return _validate_errors(baseline, "baseline"), baseline_clean_error


def _corruption_error(err: np.ndarray, base: np.ndarray, name: str) -> float:
    denom = base.sum()
    if denom <= 0:
        raise ValueError(f"baseline errors of corruption {name!r} sum to 0; CE undefined")
    return float(100.0 * err.sum() / denom)


def _relative_corruption_error(err: np.ndarray, base: np.ndarray, name: str, clean: float, base_clean: float) -> float:
    denom = float((base - base_clean).sum())
    if denom <= 0:
        raise ValueError(
            f"corruption {name!r}: baseline corrupted errors do not exceed its clean error "
            f"({base_clean}); relative CE undefined"
        )
    return float(100.0 * (err - clean).sum() / denom)


def mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    baseline: str | Mapping[str, Sequence[float]] = "alexnet",
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, Any]:
    """Corruption errors and mCE of Hendrycks & Dietterich (2019), in PERCENT.

    ``CE_c = 100 * sum_s E_{s,c} / sum_s B_{s,c}``;
    ``relative CE_c = 100 * sum_s (E_{s,c} - E_clean) / sum_s (B_{s,c} - B_clean)``;
    ``mCE`` / ``relative_mCE`` = mean over the 15 :data:`BENCHMARK_CORRUPTIONS` present.

    Args:
        errors: corruption -> five top-1 errors (fractions, severities 1..5).
        baseline: ``"alexnet"`` (the packaged table, clean error :data:`ALEXNET_CLEAN_ERROR`)
            or a mapping of the same shape (e.g. a baseline run of your own on a custom -C set).
        clean_error: the model's clean top-1 error (fraction); enables the relative metrics.
        baseline_clean_error: the baseline's clean error; defaults to 0.4348 for AlexNet and is
            required for relative metrics with a custom baseline.

    Returns (JSON-serialisable):
        ``CE``: {corruption: CE} for the benchmark corruptions present;
        ``mCE``: mean of ``CE`` (``None`` if none present);
        ``mCE_complete``: whether all 15 were present; ``missing``: the absent ones (a
        benchmark corruption counts as absent when either the model or the baseline lacks it);
        ``mCE_corruptions``: how many were averaged; ``mCE_name``: what the number is
        (:func:`mce_name`: "mCE over 2 of 15 corruptions (incomplete)" unless all 15);
        ``mean_error``: {corruption: mean top-1 error over severities, percent} for every
        corruption in ``errors``;
        ``extra_CE``: CE of every other corruption (the 4 extras, custom names) that the
        baseline covers -- never part of mCE (AlexNet has no extras, so it is empty then);
        ``no_baseline``: non-benchmark corruptions without a baseline entry;
        when ``clean_error`` is given: ``relative_CE``, ``relative_mCE``, ``extra_relative_CE``,
        ``clean_error`` and ``baseline_clean_error`` (the latter two in percent).

    Raises ValueError naming the corruption when errors are outside [0, 1] or not 5 per
    corruption, and when a relative-CE denominator is not positive.
    """
    errs = _validate_errors(errors, "errors")
    base, base_clean = _resolve_baseline(baseline, baseline_clean_error)
    clean = _check_clean(clean_error, "clean_error")
    base_clean = _check_clean(base_clean, "baseline_clean_error")
    if clean is not None and base_clean is None:
        raise ValueError("relative mCE with a custom baseline needs baseline_clean_error")

    def ce(name: str) -> float:
        return _corruption_error(errs[name], base[name], name)

    def rel_ce(name: str) -> float:
        return _relative_corruption_error(errs[name], base[name], name, clean, base_clean)

    bench = [c for c in BENCHMARK_CORRUPTIONS if c in errs and c in base]
    missing = [c for c in BENCHMARK_CORRUPTIONS if c not in bench]
    others = [c for c in errs if c not in BENCHMARK_CORRUPTIONS]
    extras = [c for c in others if c in base]

    out: dict[str, Any] = {}
    out["CE"] = {c: ce(c) for c in bench}
    out["mCE"] = float(np.mean(list(out["CE"].values()))) if bench else None
    out["mCE_complete"] = not missing
    out["missing"] = missing
    out["mCE_corruptions"] = len(bench)
    out["mCE_name"] = mce_name(out)
    out["mean_error"] = {c: float(100.0 * errs[c].mean()) for c in errs}
    out["extra_CE"] = {c: ce(c) for c in extras}
    out["no_baseline"] = [c for c in others if c not in base]
    if clean is not None:
        out["relative_CE"] = {c: rel_ce(c) for c in bench}
        out["relative_mCE"] = (
            float(np.mean(list(out["relative_CE"].values()))) if bench else None
        )
        out["extra_relative_CE"] = {c: rel_ce(c) for c in extras}
        out["clean_error"] = 100.0 * clean
        out["baseline_clean_error"] = 100.0 * base_clean
    return out


def mce_name(corruption: Mapping[str, Any]) -> str:
    """What ``corruption["mCE"]`` is: "mCE" when all 15 benchmark corruptions were averaged, else
    "mCE over K of 15 corruptions (incomplete)" - a partial mean is not the benchmark's mCE
    (docs/metrics.md). ``corruption``: the output of :func:`mean_corruption_error`."""
    present = len(corruption.get("CE") or {})
    total = len(BENCHMARK_CORRUPTIONS)
    if corruption.get("mCE_complete", present == total or "CE" not in corruption):   # no CE listed: cannot tell
        return "mCE"
    return f"mCE over {present} of {total} corruptions (incomplete)"


def describe_mce(corruption: Mapping[str, Any], unit: str = "") -> str | None:
    """The mCE as a person reads it, e.g. "mCE over 2 of 15 corruptions (incomplete) 63.50, relative
    mCE over 2 of 15 corruptions (incomplete) 80.10 (<baseline note>)"; None without an mCE.
    ``unit``: appended to each number (e.g. "%")."""
    if corruption.get("mCE") is None:
        return None
    name = mce_name(corruption)
    text = f"{name} {float(corruption['mCE']):.2f}{unit}"
    if corruption.get("relative_mCE") is not None:
        text += f", relative {name} {float(corruption['relative_mCE']):.2f}{unit}"
    if corruption.get("baseline_note"):
        text += f" ({corruption['baseline_note']})"
    return text


def imagenet_classes(wnids: Sequence[str] | None) -> bool:
    """Whether a model's classes are ImageNet's 1000 (synset ids "n01440764", ...): the classes
    the AlexNet ImageNet-C errors, the mCE normaliser, were measured on."""
    return bool(wnids) and len(wnids) == 1000 and all(re.fullmatch(r"n\d{8}", str(w)) for w in wnids)


def errors_from_accuracy_table(
    accuracies: Mapping[str, Sequence[float] | Mapping[int, float]],
) -> dict[str, list[float]]:
    """Convert top-1 accuracies (fractions) to errors: corruption -> [1 - acc_s, s = 1..5].

    Each value is a list of 5 accuracies (severities 1..5) or a mapping severity (1..5, int or
    str) -> accuracy. Raises ValueError naming the corruption when a severity is missing.
    """
    out: dict[str, list[float]] = {}
    for name, accs in accuracies.items():
        if isinstance(accs, Mapping):
            by_sev = {int(k): float(v) for k, v in accs.items()}
            missing = [s for s in range(1, NUM_SEVERITIES + 1) if s not in by_sev]
            if missing:
                raise ValueError(f"corruption {name!r}: missing severities {missing}")
            vals = [by_sev[s] for s in range(1, NUM_SEVERITIES + 1)]
        else:
            vals = [float(v) for v in _to_numpy(accs).reshape(-1)]
        out[str(name)] = [1.0 - v for v in vals]
    _validate_errors(out, "accuracies")
    return out
