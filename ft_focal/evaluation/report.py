"""Markdown reports with PNG plots: of one run, of one evaluation, or a comparison of runs.

`ft-focal report RUN_DIR [RUN_DIR ...] [--out DIR]` compares runs (each a folder with a
metrics.json) in one table, one grouped bar chart and their learning curves overlaid (training
loss from train_log.jsonl, validation accuracy from metrics.json, by update).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ft_focal.errors import UserError
from ft_focal.evaluation import plots
from ft_focal.metrics import describe_mce

logger = logging.getLogger(__name__)
GROUPS = ("overall", "many", "medium", "few")


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def accuracy_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per named result dict (fractions -> percent)."""
    lines = ["| run | overall | many | medium | few | ECE |", "|---|---|---|---|---|---|"]
    for name, res in rows.items():
        res = res or {}
        lines.append(f"| {name} | " + " | ".join(_pct(res.get(k)) for k in (*GROUPS, "ece")) + " |")
    return "\n".join(lines)


def corruption_section(corruption: dict, directory: Path, prefix: str = "") -> list[str]:
    """CE bar chart, error-vs-severity curves and a per-corruption table."""
    lines = ["", "## Corruption robustness", ""]
    if corruption.get("preprocessing"):
        lines.append(f"Preprocessing: {corruption['preprocessing']}.  Baseline: {corruption.get('baseline', 'alexnet')}.")
    if corruption.get("mCE") is not None:
        lines.append(f"\n**{describe_mce(corruption)}**")
    if corruption.get("CE"):
        plots.plot_corruption_errors(corruption, directory / f"{prefix}corruption_ce.png")
        lines.append(f"\n![CE per corruption]({prefix}corruption_ce.png)")
    if corruption.get("errors"):
        plots.plot_error_vs_severity(corruption["errors"], directory / f"{prefix}error_vs_severity.png")
        lines.append(f"\n![error vs severity]({prefix}error_vs_severity.png)\n")
        lines += ["| corruption | CE | errors s1..s5 (%) |", "|---|---|---|"]
        ce = {**(corruption.get("CE") or {}), **(corruption.get("extra_CE") or {})}
        for name, errs in corruption["errors"].items():
            ce_text = f"{ce[name]:.1f}" if name in ce and ce[name] is not None else "—"
            lines.append(f"| {name} | {ce_text} | " + " ".join(f"{100 * e:.1f}" for e in errs) + " |")
    return lines


def _accuracy_plots(result: dict, class_counts: Optional[list[int]], directory: Path, prefix: str, label: str) -> list[str]:
    lines = []
    plots.plot_group_accuracy({label: result}, directory / f"{prefix}group_accuracy.png")
    lines.append(f"\n![accuracy by shot group]({prefix}group_accuracy.png)")
    if class_counts and result.get("per_class"):
        plots.plot_per_class_accuracy(result["per_class"], class_counts, directory / f"{prefix}per_class_accuracy.png")
        lines.append(f"\n![per-class accuracy vs training count]({prefix}per_class_accuracy.png)")
    return lines


def write_run_report(run_dir: Path, metrics: dict) -> Path:
    """`run_dir/report.md` with the accuracy table, shot-group and per-class plots, history."""
    run_dir = Path(run_dir)
    test = metrics.get("test") or {}
    lines = [f"# Run report: {metrics.get('recipe', run_dir.name)}", "",
             f"Optimizer `{metrics.get('optimizer')}`, {metrics.get('updates')} updates on "
             f"{metrics.get('world_size')} process(es), {metrics.get('train_seconds')} s. "
             f"Model selection: {metrics.get('selected')}. Skipped (non-finite) updates: {metrics.get('skipped_steps')}.",
             "", "Accuracy in percent; shot groups from training counts (many > 100, few < 20).", "",
             accuracy_table({split: metrics.get(split) for split in ("val", "test") if metrics.get(split)})]
    if metrics.get("zero_shot"):  # the first thing a reader must know about these numbers
        lines[2:2] = [f"**Zero-shot baseline: no training update.** The model is the initial one, head from "
                      f"`{metrics.get('head_init')}`.", ""]
    if test:
        lines += _accuracy_plots(test, metrics.get("class_counts"), run_dir, "", "test")
    curve = _learning_curves({metrics.get("recipe", run_dir.name): run_dir}, run_dir / "learning_curves.png",
                             {metrics.get("recipe", run_dir.name): metrics})
    if curve:
        lines += ["", "## Learning curves", "", f"![learning curves]({curve})"]
    if metrics.get("history"):
        lines += ["", "## Validation history", "", "| epoch | update | overall | many | medium | few |",
                  "|---|---|---|---|---|---|"]
        for h in metrics["history"]:
            v = h.get("val", {})
            lines.append(f"| {h['epoch'] + 1} | {h['step']} | " + " | ".join(_pct(v.get(k)) for k in GROUPS) + " |")
    sharp = run_dir / "sharpness" / "sharpness.json"
    if sharp.is_file():
        lines += ["", "## Sharpness by shot group", "", f"See [sharpness/]({'sharpness/sharpness.json'})."]
        if (run_dir / "sharpness" / "sharpness.png").is_file():
            lines.append("\n![sharpness](sharpness/sharpness.png)")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _learning_curves(runs: dict[str, Path], path: Path, metrics: dict[str, dict]) -> Optional[str]:
    """learning_curves.png from each run's train_log.jsonl and validation history; its name, or
    None when no run has either."""
    from ft_focal.training.log import read_train_log

    data = {name: (read_train_log(run), metrics[name].get("history") or []) for name, run in runs.items()}
    if not any(records or history for records, history in data.values()):
        return None
    plots.plot_learning_curves(data, path)
    return path.name


def write_eval_report(result: dict, directory: Path, class_counts_path: Optional[Path] = None) -> Path:
    """`directory/eval_report.md` for one `ft-focal eval` result."""
    directory = Path(directory)
    counts = json.loads(class_counts_path.read_text()) if class_counts_path and class_counts_path.is_file() else None
    split = result.get("split", "test")
    lines = [f"# Evaluation: {result.get('recipe')} on {split}", "",
             f"Model: `{result.get('model_dir')}`. Preprocessing: {result.get('preprocessing')}.", "",
             accuracy_table({split: result.get(split)})]
    lines += _accuracy_plots(result[split], counts, directory, "eval_", split)
    if result.get("corruption"):
        lines += corruption_section(result["corruption"], directory, "eval_")
    path = directory / "eval_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_metrics(run: Path) -> dict:
    for name in ("metrics.json", "eval.json"):
        file = run / name if run.is_dir() else run
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}: corrupt JSON ({exc})") from None
    raise UserError(f"{run}: no metrics.json or eval.json")


def compare_runs(runs: list[Path], out: Path) -> Path:
    """One table and one grouped bar chart over several runs' test results."""
    results, metrics, dirs = {}, {}, {}
    for run in runs:
        name = _unique(Path(run).name, results)
        metrics[name] = load_metrics(Path(run))
        results[name] = metrics[name].get("test") or {}
        dirs[name] = Path(run) if Path(run).is_dir() else Path(run).parent
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_group_accuracy(results, out / "comparison.png")
    lines = ["# Comparison (test accuracy, %)", "", accuracy_table(results), "", "![comparison](comparison.png)"]
    curve = _learning_curves(dirs, out / "learning_curves.png", metrics)
    if curve:
        lines += ["", "## Learning curves", "", f"![learning curves]({curve})"]
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _unique(name: str, taken: dict) -> str:
    """`name`, or `name (2)`, ... when two runs share a folder name (e.g. a/final and b/final)."""
    serial, candidate = 1, name
    while candidate in taken:
        serial += 1
        candidate = f"{name} ({serial})"
    return candidate
