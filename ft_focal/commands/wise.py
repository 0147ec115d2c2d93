"""`ft-focal wise RUN_DIR [key=value ...] [--alphas 0:1:0.1 | 0,0.5,1] [--alpha A] [--suite 'SUITE.yaml k=v' ...] [--export DIR]`.

WiSE-FT: evaluate the interpolations of a run's initial and fine-tuned model (ft_focal/evaluation/wise.py)
on validation, test and every suite, choose alpha on validation (or take --alpha), write RUN_DIR/wise/
(ft_focal/evaluation/wise_sweep.py) and optionally export the chosen model (`ft-focal export`).
"""

from __future__ import annotations

import sys
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _run(argv: Optional[list[str]]) -> int:
    from ft_focal.commands.eval import load_suite_args
    from ft_focal.evaluation.wise import parse_alphas
    from ft_focal.evaluation.wise_sweep import run_wise
    from ft_focal.training.accelerator import make_accelerator

    parser = CommandParser(prog="ft-focal wise", description="WiSE-FT: interpolate the initial and the "
                           "fine-tuned model of a run, by shot group, in and out of distribution.")
    parser.add_argument("run_dir", help="a training run's output_dir (with final/ and initial_head.safetensors)")
    parser.add_argument("--alphas", default="0:1:0.1", help="START:STOP:STEP (stop included) or a,b,c (default 0:1:0.1)")
    parser.add_argument("--alpha", type=float, help="use this alpha instead of choosing on validation")
    parser.add_argument("--suite", action="append", default=[], metavar="'SUITE.yaml [key=value ...]'",
                        help="robustness suite to evaluate every alpha on (repeatable)")
    parser.add_argument("--export", metavar="EXPORT_DIR", help="also export the chosen model (as `ft-focal export`)")
    args = parser.parse_command(argv)
    alphas = parse_alphas(args.alphas)
    if args.alpha is not None:
        parse_alphas(str(args.alpha))  # the same range check
    suites = load_suite_args(args.suite)
    accelerator = make_accelerator()
    out = run_wise(args.run_dir, alphas, args.alpha, suites, accelerator, args.export, args.overrides)
    if accelerator.is_main_process:
        from pathlib import Path

        from ft_focal.evaluation.wise_report import wise_table

        print("\n".join(wise_table(out)))
        print(f"chosen alpha {out['chosen_alpha']:g} ({out['chosen_by']}) -> {Path(out['run']) / 'wise'}"
              + (f"; exported to {args.export}" if args.export else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
