"""wise.md and wise_curve.png of `ft-focal wise` (ft_focal/evaluation/wise_sweep.py).

The table gives, per alpha, the validation accuracy, the in-distribution test accuracy and every
shift's accuracy, overall / many / medium / few (percent). The curve plots each shift's accuracy
against the in-distribution accuracy as alpha goes from 0 (initial model) to 1 (fine-tuned), one
panel per shot group (the WiSE-FT figure, split by the classes' training counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ft_focal.evaluation.robustness_report import robustness_section
from ft_focal.evaluation.shift_eval import GROUPS


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _groups(result: Optional[dict]) -> str:
    result = result or {}
    return " / ".join(_pct(result.get(g)) for g in GROUPS)


def wise_table(out: dict) -> list[str]:
    """Markdown: one row per alpha; each cell 'overall / many / medium / few' in percent."""
    id_split = out["id_split"]
    shift_names = [s["name"] for s in (out["rows"][0]["shifts"] if out["rows"] else [])]
    head = ["alpha", "val", f"ID ({id_split})"] + shift_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in out["rows"]:
        mark = " *" if row["alpha"] == out["chosen_alpha"] else ""
        cells = [f"{row['alpha']:g}{mark}", _groups(row.get("val")), _groups(row.get(id_split))]
        cells += [_groups(s["result"]) for s in row["shifts"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_wise_curve(out: dict, path: Path) -> Optional[Path]:
    """OOD vs ID accuracy (percent) per shot group, points labelled by alpha; None without shifts."""
    from ft_focal.evaluation import plots

    rows, id_split = out["rows"], out["id_split"]
    if not rows or not rows[0]["shifts"]:
        return None
    fig, axes = plots._subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 4))
    for ax, group in zip(np.atleast_1d(axes), GROUPS, strict=True):
        ids = [row[id_split].get(group) for row in rows]
        for k, shift in enumerate(rows[0]["shifts"]):
            ood = [row["shifts"][k]["result"].get(group) for row in rows]
            pts = [(100 * x, 100 * y, row["alpha"]) for x, y, row in zip(ids, ood, rows, strict=True)
                   if x is not None and y is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shift["name"])
            for x, y, a in (pts[0], pts[-1]) if len(pts) > 1 else pts:
                ax.annotate(f"a={a:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title(group)
        ax.set_xlabel(f"ID accuracy ({id_split}, %)")
        ax.set_ylabel("OOD accuracy (%)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    return plots._save(fig, path)


def write_wise_report(wise_dir: Path, out: dict, robustness: dict) -> Path:
    lines = [f"# WiSE-FT: {out['run']}", "",
             f"Tuning `{out['tuning']}`. Interpolation between the initial model (alpha = 0) and the fine-tuned one "
             "(alpha = 1), docs/algorithms.md \"WiSE-FT\". Chosen: **alpha = "
             f"{out['chosen_alpha']:g}** ({out['chosen_by']}; marked *). Each cell: overall / many / medium / few "
             "top-1 accuracy (%), shot groups from the training counts.", ""]
    lines += wise_table(out)
    curve = plot_wise_curve(out, wise_dir / "wise_curve.png")
    if curve is not None:
        lines += ["", "![OOD vs ID accuracy by shot group](wise_curve.png)"]
    if robustness.get("shifts"):
        lines += robustness_section(robustness, wise_dir, "chosen_")
    path = wise_dir / "wise.md"
    path.write_text("\n".join(lines) + "\n")
    return path
