"""Regenerate the demo table: the three demo recipes x three seeds, test accuracy by shot group.

    python benchmarks/demo_table.py                         # 9 runs, ~1-2 min CPU each, sequential
    python benchmarks/demo_table.py --seeds 0 --recipes digits_lt_focal_sam   # one run
    python benchmarks/demo_table.py --out benchmarks/results/demo_table_DATE.md
    python benchmarks/demo_table.py --from-log run.log   # the table from the lines a run printed

Each run is `ft-focal train recipes/demo/<recipe>.yaml seed=S output_dir=<tmp> train.threads=1` in a
subprocess (a fresh output directory, so nothing resumes). The table gives overall / many / medium
/ few test accuracy in % (per-class accuracies averaged over the classes of each group,
docs/metrics.md) for each seed, and their mean. The recipe headers and the README quote the
results file this writes; tests/test_published_numbers.py checks the quoted numbers against it.
Accuracy is printed to two decimals because the test split has 30 images a class: one image
moves a group of 2 classes by 1.67 points.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("digits_lt_erm", "digits_lt_sam", "digits_lt_focal_sam")
SEEDS = (0, 1, 2)
GROUPS = ("overall", "many", "medium", "few")


def run_one(recipe: str, seed: int, workdir: Path) -> dict:
    """Train one demo recipe with one seed; returns its test metrics (fractions) and wall seconds."""
    out = workdir / f"{recipe}_seed{seed}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ft_focal.commands.train", str(REPO / "recipes" / "demo" / f"{recipe}.yaml"),
           f"seed={seed}", f"output_dir={out}", "train.threads=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    return {"recipe": recipe, "seed": seed, "wall_s": round(time.perf_counter() - t0, 1),
            "updates": metrics["updates"], "pass_counts": metrics["pass_counts"],
            **{g: round(100 * test[g], 2) for g in GROUPS}}


LINE = re.compile(r"^(\S+) seed (\d+): ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+)  \(([\d.]+) s\)$")


def rows_from_log(text: str) -> list[dict]:
    """The rows a run printed (one line per finished run), e.g. of a run stopped before the end."""
    rows = []
    for line in text.splitlines():
        found = LINE.match(line.strip())
        if found:
            recipe, seed, *values, wall = found.groups()
            rows.append({"recipe": recipe, "seed": int(seed), "wall_s": float(wall),
                         **{g: float(v) for g, v in zip(GROUPS, values, strict=True)}})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per recipe and seed, then the mean over seeds of each recipe."""
    lines = ["| recipe | seed | overall | many | medium | few |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | " + " | ".join(f"{r[g]:.2f}" for g in GROUPS) + " |")
    lines += ["", "| recipe | mean over seeds | overall | many | medium | few |", "|---|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        seeds = ",".join(str(r["seed"]) for r in mine)
        lines.append(f"| {recipe} | {seeds} | "
                     + " | ".join(f"{statistics.mean(r[g] for r in mine):.2f}" for g in GROUPS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/"
                        "demo_table_<date>.md); a .json with the same stem holds the raw rows")
    parser.add_argument("--from-log", default=None, help="build the table from the lines a run printed "
                        "(its stdout) instead of training; the header says so")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"demo_table_{today}.md"
    rows = rows_from_log(Path(args.from_log).read_text()) if args.from_log else []
    with tempfile.TemporaryDirectory(prefix="demo_table_") as tmp:
        for recipe in [] if args.from_log else args.recipes.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = run_one(recipe, seed, Path(tmp))
                print(f"{recipe} seed {seed}: " + " / ".join(f"{row[g]:.2f}" for g in GROUPS)
                      + f"  ({row['wall_s']} s)", flush=True)
                rows.append(row)
    import torch

    header = (f"# Demo table: test accuracy (%) of the demo recipes, {today}\n\n"
              f"Written by `python benchmarks/demo_table.py` (train.threads=1, CPU, {platform.machine()}, "
              f"torch {torch.__version__}). Groups: many > 100, medium 20..100, few < 20 training images "
              f"(per-class accuracies averaged within the group, docs/metrics.md).\n"
              + (f"Rows read from the printed lines of a run (--from-log): {len(rows)} finished runs.\n"
                 if args.from_log else "")
              + "Wall seconds per run (shared machine; not a benchmark): "
              + ", ".join(f"{r['recipe']}/{r['seed']} {r['wall_s']}" for r in rows) + "\n\n")
    body = table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
