"""PNG plots of long-tail accuracy, ImageNet-C errors and sharpness diagnostics.

Every function draws one figure on matplotlib's Agg canvas (``matplotlib.figure.Figure``, no
pyplot global state, so it is safe in headless and threaded use), writes a PNG to
``path`` (parent directories are created), closes the figure and returns the path as a
``pathlib.Path``. Inputs are the plain dicts / lists produced by :mod:`ft_focal.metrics` and
:mod:`ft_focal.sharpness` (``None`` entries -- e.g. classes without test samples -- are skipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ft_focal.metrics import BENCHMARK_CORRUPTIONS, mce_name, shot_groups

__all__ = [
    "plot_per_class_accuracy",
    "plot_group_accuracy",
    "plot_corruption_errors",
    "plot_error_vs_severity",
    "plot_sharpness",
    "plot_trace_vs_count",
    "plot_learning_curves",
]

_GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
_DPI = 110


def _subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png", dpi=_DPI, bbox_inches="tight")
    return p


def _finite(x: Any) -> bool:
    return x is not None and np.isfinite(float(x))


def plot_per_class_accuracy(
    per_class_acc: Sequence[float | None],
    class_counts: Sequence[int],
    path: str | os.PathLike,
    many: int = 100,
    few: int = 20,
    title: str | None = None,
) -> Path:
    """Scatter of per-class test accuracy (fraction, ``[C]``, ``None`` = no test samples)
    against TRAINING count (log x axis), coloured by shot group, with the group boundaries
    (``few`` and ``many``) drawn as vertical lines. Classes with 0 training images are drawn
    at x = 0.8 (the log axis has no 0)."""
    acc = list(per_class_acc)
    counts = np.asarray(class_counts, dtype=np.float64)
    if len(acc) != counts.size:
        raise ValueError(f"{len(acc)} accuracies but {counts.size} class counts")
    groups = shot_groups(counts, many=many, few=few)
    fig, ax = _subplots(figsize=(7, 4))
    for g, color in _GROUP_COLORS.items():
        idx = [i for i in range(len(acc)) if groups[i] == g and _finite(acc[i])]
        if idx:
            ax.scatter(np.maximum(counts[idx], 0.8), [100 * float(acc[i]) for i in idx],
                       s=12, alpha=0.7, color=color, label=f"{g} ({len(idx)})")
    for b in (few, many):
        ax.axvline(b, color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "Per-class accuracy vs training count")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_group_accuracy(
    results_by_run: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Grouped bars of overall / many / medium / few accuracy (percent) for one or several runs.

    ``results_by_run``: run name -> a :func:`ft_focal.metrics.long_tail_accuracy` dict
    (fractions; ``None`` groups are drawn as missing bars)."""
    if not results_by_run:
        raise ValueError("results_by_run is empty")
    keys = ["overall", "many", "medium", "few"]
    runs = list(results_by_run)
    width = 0.8 / len(runs)
    x = np.arange(len(keys))
    fig, ax = _subplots(figsize=(max(6, 1.2 * len(runs) + 4), 4))
    for i, run in enumerate(runs):
        vals = [results_by_run[run].get(k) for k in keys]
        heights = [100 * float(v) if _finite(v) else 0.0 for v in vals]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=run)
        for bar, v in zip(bars, vals, strict=True):
            label = f"{100 * float(v):.1f}" if _finite(v) else "n/a"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, keys)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Accuracy by shot group")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_corruption_errors(
    ce_dict: Mapping[str, Any], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Bar chart of per-corruption CE (percent) with the mCE as a horizontal line.

    ``ce_dict`` is either the output of :func:`ft_focal.metrics.mean_corruption_error` (its
    ``"CE"`` and ``"extra_CE"`` are drawn; extras hatched, not in the mCE line) or a plain
    ``{corruption: CE percent}`` mapping (the mCE line is then the mean of the benchmark
    corruptions present, or of all if none is a benchmark one)."""
    if "CE" in ce_dict and isinstance(ce_dict["CE"], Mapping):
        ce = dict(ce_dict["CE"])
        extra = dict(ce_dict.get("extra_CE") or {})
        mce = ce_dict.get("mCE")
        name = mce_name(ce_dict)
    else:
        ce = {k: v for k, v in ce_dict.items() if k in BENCHMARK_CORRUPTIONS}
        extra = {k: v for k, v in ce_dict.items() if k not in BENCHMARK_CORRUPTIONS}
        if not ce:
            ce, extra = extra, {}
        mce = float(np.mean(list(ce.values()))) if ce else None
        name = mce_name({"CE": ce})
    names = list(ce) + list(extra)
    if not names:
        raise ValueError("no corruption errors to plot")
    vals = [float(ce[n]) for n in ce] + [float(extra[n]) for n in extra]
    fig, ax = _subplots(figsize=(max(7, 0.45 * len(names) + 2), 4.5))
    bars = ax.bar(range(len(names)), vals, color="tab:blue")
    for bar in bars[len(ce):]:
        bar.set_facecolor("lightgray")
        bar.set_edgecolor("dimgray")
        bar.set_hatch("//")
    if _finite(mce):
        ax.axhline(float(mce), color="tab:red", lw=1.5, label=f"{name} = {float(mce):.1f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("corruption error CE (%)")
    ax.set_title(title or "ImageNet-C corruption errors" + ("" if name == "mCE" else f"\n{name}"))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_error_vs_severity(
    errors: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Top-1 error (percent) against severity 1..5, one line per corruption.

    ``errors``: corruption -> five errors (fractions, severities 1..5)."""
    if not errors:
        raise ValueError("no errors to plot")
    fig, ax = _subplots(figsize=(8, 5))
    cmap = matplotlib.colormaps["tab20"]
    for i, (name, vals) in enumerate(errors.items()):
        v = [100 * float(e) for e in vals]
        ax.plot(range(1, len(v) + 1), v, marker="o", ms=3, lw=1, color=cmap(i % 20), label=name)
    ax.set_xticks(range(1, 6))
    ax.set_xlabel("severity")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title(title or "Error vs corruption severity")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sharpness(
    group_results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Three panels per group: top Hessian eigenvalue, Hessian trace (with stderr bars) and
    first-order SAM sharpness, from :func:`ft_focal.sharpness.group_sharpness` output."""
    if not group_results:
        raise ValueError("group_results is empty")
    names = list(group_results)
    colors = [_GROUP_COLORS.get(n, "tab:purple") for n in names]

    def get(entry: Mapping[str, Any], key: str) -> float:
        v = entry.get(key)
        if key == "eigenvalues":
            v = v[0] if v else None
        return float(v) if _finite(v) else np.nan

    fig, axes = _subplots(1, 3, figsize=(11, 3.8))
    panels = [("eigenvalues", "top Hessian eigenvalue"), ("trace", "Hessian trace (Hutchinson)"),
              ("sam_sharpness", "SAM sharpness L(w+e)-L(w)")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        vals = [get(group_results[n], key) for n in names]
        err = None
        if key == "trace":
            err = [get(group_results[n], "trace_stderr") for n in names]
            err = [0.0 if np.isnan(e) else e for e in err]
        ax.bar(range(len(names)), np.nan_to_num(vals), yerr=err, color=colors, capsize=3)
        for i, v in enumerate(vals):
            if np.isnan(v):
                ax.annotate("n/a", (i, 0), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Sharpness by group", fontsize=10)
    return _save(fig, path)


def plot_trace_vs_count(
    per_class_trace: Mapping[Any, Any], class_counts: Sequence[int], path: str | os.PathLike,
    many: int = 100, few: int = 20, title: str | None = None,
) -> Path:
    """Per-class Hessian trace against TRAINING count (log x), coloured by shot group.

    ``per_class_trace``: class id (int or str) -> trace, or -> ``{"trace": ..,
    "trace_stderr": ..}`` (drawn with error bars), e.g. from
    :func:`ft_focal.sharpness.collect_per_class_trace`."""
    counts = np.asarray(class_counts, dtype=np.float64)
    groups = shot_groups(counts, many=many, few=few)
    pts: dict[str, list[tuple[float, float, float]]] = {g: [] for g in _GROUP_COLORS}
    for c, v in per_class_trace.items():
        c = int(c)
        if not 0 <= c < counts.size:
            raise ValueError(f"class {c} out of range for {counts.size} class counts")
        if isinstance(v, Mapping):
            t, s = v.get("trace"), v.get("trace_stderr")
        else:
            t, s = v, None
        if _finite(t):
            pts[groups[c]].append((max(counts[c], 0.8), float(t), float(s) if _finite(s) else 0.0))
    if not any(pts.values()):
        raise ValueError("no finite per-class traces to plot")
    fig, ax = _subplots(figsize=(7, 4))
    for g, color in _GROUP_COLORS.items():
        if pts[g]:
            x, y, e = zip(*pts[g], strict=True)
            ax.errorbar(x, y, yerr=e, fmt="o", ms=4, color=color, alpha=0.8, capsize=2,
                        label=f"{g} ({len(x)})")
    for b in (few, many):
        ax.axvline(b, color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log)")
    ax.set_ylabel("Hessian trace of the class loss")
    ax.set_title(title or "Per-class Hessian trace vs training count")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(runs: Mapping[str, tuple[Sequence[dict], Sequence[dict]]],
                         path: str | os.PathLike) -> Path:
    """Training loss and validation accuracy by update, one colour per run.

    ``runs``: name -> (train_log.jsonl records with ``update`` / ``loss``, validation history
    entries with ``step`` and ``val.overall`` as in metrics.json). Several runs overlay.
    """
    fig, (ax_loss, ax_val) = _subplots(1, 2, figsize=(10.0, 3.8))
    for i, (name, (records, history)) in enumerate(runs.items()):
        color = f"C{i % 10}"
        pts = [(r["update"], r["loss"]) for r in records if "update" in r and _finite(r.get("loss"))]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), color=color, lw=1.3, label=name)
        val = [(h["step"], 100 * h["val"]["overall"]) for h in history
               if _finite((h.get("val") or {}).get("overall"))]
        if val:
            ax_val.plot(*zip(*val, strict=True), color=color, marker="o", ms=3.5, lw=1.3, label=name)
    ax_loss.set(xlabel="update", ylabel="training loss (mean since previous log line)", title="Training loss")
    ax_val.set(xlabel="update", ylabel="validation accuracy, overall (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    return _save(fig, path)
