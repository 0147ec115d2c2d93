"""`ft-focal report RUN_DIR [RUN_DIR ...] [--out DIR]`: the report of one run, or a comparison (ft_focal/evaluation/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _run(argv: Optional[list[str]]) -> int:
    from ft_focal.evaluation.report import compare_runs, load_metrics, write_run_report

    parser = CommandParser(overrides=False, prog="ft-focal report", description="Report of one run, or a comparison.")
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.json)")
    parser.add_argument("--out", help="output directory (default: the run itself / ./comparison)")
    args = parser.parse_command(argv)
    runs = [Path(r) for r in args.runs]
    if len(runs) == 1:
        path = write_run_report(Path(args.out) if args.out else runs[0], load_metrics(runs[0]))
    else:
        path = compare_runs(runs, Path(args.out or "comparison"))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
