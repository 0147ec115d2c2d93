"""`ft-focal eval RUN_OR_MODEL_DIR [key=value ...] [--out FILE] [--five-crop] [--imagenet-c ROOT] [--baseline ...]`.

Long-tail accuracy by shot group, ECE and (with --imagenet-c) CE / mCE of a run (its final/ folder), a final/ folder
or an export (ft_focal/evaluation/evaluate.py); writes the metrics JSON and, unless --no-report, the
Markdown report. Several processes: `accelerate launch -m ft_focal.commands.eval MODEL_DIR ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded
from ft_focal.files import write_json
from ft_focal.training.log import percent


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def _run(argv: Optional[list[str]]) -> int:
    from ft_focal.artifacts.export import resolve_model_dir
    from ft_focal.evaluation.evaluate import evaluate_saved
    from ft_focal.evaluation.report import write_eval_report
    from ft_focal.training.accelerator import make_accelerator

    parser = CommandParser(prog="ft-focal eval", description="Evaluate a trained / exported model.")
    parser.add_argument("model_dir", help="a run folder (its final/ is evaluated), a final/ folder or an export")
    parser.add_argument("--out", help="write the metrics JSON here (default MODEL_DIR/eval.json)")
    parser.add_argument("--split", help="split to evaluate (default: the recipe's test split)")
    parser.add_argument("--five-crop", action="store_true", default=None, help="LIFT test-time five-crop ensemble")
    parser.add_argument("--imagenet-c", help="root of an ImageNet-C layout folder to evaluate as well")
    parser.add_argument("--baseline", help="'alexnet' (default) or a baseline run's eval JSON for custom -C sets")
    parser.add_argument("--suite", action="append", default=[], metavar="'SUITE.yaml [key=value ...]'",
                        help="robustness suite (eval/*.yaml: shifts, ImageNet-C), with its overrides in the same "
                             "argument; repeat for several: one table and plot against in-distribution")
    parser.add_argument("--no-report", action="store_true", help="do not write the Markdown report / plots")
    args = parser.parse_command(argv)
    model_dir = resolve_model_dir(args.model_dir)
    suites = load_suite_args(args.suite)
    accelerator = make_accelerator()
    result = evaluate_saved(str(model_dir), args.overrides, args.split, args.five_crop, args.imagenet_c,
                            args.baseline, accelerator, suites)
    if accelerator.is_main_process:
        out = Path(args.out) if args.out else model_dir / "eval.json"
        write_json(out, result)
        if not args.no_report:
            report = write_eval_report(result, out.parent, class_counts_path=model_dir / "class_counts.json")
            if result.get("robustness"):
                from ft_focal.evaluation.robustness_report import robustness_section

                with report.open("a") as handle:
                    handle.write("\n".join(robustness_section(result["robustness"], out.parent, "eval_")) + "\n")
        test = result["test"]
        print(f"{result['split']}: overall {percent(test['overall'])} many {percent(test['many'])} "
              f"medium {percent(test['medium'])} few {percent(test['few'])} -> {out}")
        if "corruption" in result and result["corruption"].get("mCE") is not None:
            from ft_focal.metrics import describe_mce

            print(describe_mce(result["corruption"]))
        for row in (result.get("robustness") or {}).get("shifts", []):
            res = row["result"]
            print(f"{row['name']}: overall {percent(res.get('overall'))} many {percent(res.get('many'))} "
                  f"medium {percent(res.get('medium'))} few {percent(res.get('few'))}")
    return 0


def load_suite_args(values: list[str]) -> list[dict]:
    """`--suite 'FILE [key=value ...]'` values -> validated suites (eval/README.md)."""
    import shlex

    from ft_focal.errors import UserError
    from ft_focal.evaluation.suites import load_eval_suite

    suites = []
    for value in values:
        parts = shlex.split(value)
        if not parts:
            raise UserError("--suite: empty value (expected 'SUITE.yaml [key=value ...]')")
        if not Path(parts[0]).is_file():
            raise UserError(f"--suite: {parts[0]}: suite file not found")
        suites.append(load_eval_suite(parts[0], parts[1:]))
    return suites


if __name__ == "__main__":
    sys.exit(main())
