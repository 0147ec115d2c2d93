"""The robustness report: in-distribution accuracy against every shift and ImageNet-C, by shot group.

One Markdown table and one plot (grouped bars, plots.plot_group_accuracy) for the output of
`evaluate_suites` (ft_focal/evaluation/shift_eval.py); the same table goes into the model card's
results section when the exported model's eval.json holds a "robustness" entry
(`ft-focal eval MODEL --suite ...` writes it). Metrics: docs/metrics.md "Distribution shifts".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ft_focal.evaluation import plots

GROUPS = ("overall", "many", "medium", "few")


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _signed(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def robustness_table(robustness: dict, id_label: str = "in-distribution (test)") -> list[str]:
    """Markdown rows: accuracy (%) by shot group, the drop ID - OOD (points, overall) and the
    effective robustness (points; '—' without a fit in the suite file)."""
    lines = ["| test set | overall | many | medium | few | drop (overall) | effective robustness |",
             "|---|---|---|---|---|---|---|"]
    ident = robustness.get("in_distribution") or {}
    lines.append(f"| {id_label} | " + " | ".join(_pct(ident.get(g)) for g in GROUPS) + " | | |")
    for row in robustness.get("shifts", []):
        res = row.get("result") or {}
        name = row["name"] + (f" (mCE {res['mCE']:.1f})" if res.get("mCE") is not None else "")
        lines.append(f"| {name} | " + " | ".join(_pct(res.get(g)) for g in GROUPS)
                     + f" | {_pct((row.get('drop') or {}).get('overall'))} | {_signed(row.get('effective_robustness'))} |")
    return lines


def robustness_section(robustness: dict, directory: Optional[Path] = None, prefix: str = "") -> list[str]:
    """The report's section (table + notes), and its plot `<prefix>robustness.png` when `directory` is given."""
    lines = ["", "## Robustness: in-distribution vs distribution shifts", "",
             "Top-1 accuracy (%) overall and by the shot group of each class in the TRAINING data "
             "(group accuracy = mean per-class accuracy over the group's classes present in the set). "
             "Drop = ID - OOD accuracy (points). Effective robustness = OOD accuracy minus the accuracy the "
             "suite's logit-space fit predicts from the ID accuracy (Taori et al. 2020; docs/metrics.md); "
             "'—' where the suite gives no fit. ImageNet-C: accuracy pooled over the suite's benchmark "
             "corruptions and severities.", ""]
    lines += robustness_table(robustness)
    fits = {row["fit"]["source"] for row in robustness.get("shifts", []) if row.get("fit")}
    if fits:
        lines += ["", "Fits: " + "; ".join(sorted(fits)) + "."]
    if directory is not None and robustness.get("shifts"):
        results = {"in-distribution": robustness.get("in_distribution") or {}}
        results.update({row["name"]: row["result"] for row in robustness["shifts"]})
        plots.plot_group_accuracy(results, Path(directory) / f"{prefix}robustness.png",
                                  title="In-distribution vs distribution shifts, by shot group")
        lines += ["", f"![robustness by shot group]({prefix}robustness.png)"]
    return lines


def card_lines(eval_result: Optional[dict]) -> list[str]:
    """The model card's robustness table (empty when the evaluation ran no suite)."""
    robustness = (eval_result or {}).get("robustness")
    if not robustness or not robustness.get("shifts"):
        return []
    return ["", "Robustness (`ft-focal eval --suite`): top-1 accuracy (%) by shot group under distribution shift.", ""] \
        + robustness_table(robustness)


__all__ = ["card_lines", "robustness_section", "robustness_table"]
