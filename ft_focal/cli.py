"""`ft-focal train|eval|corrupt|check-data|export|push|report|sharpness|wise|sweep` — thin dispatch.

Each subcommand is one module of ft_focal/commands/ (`main(argv) -> exit code`), imported only
when it runs. What they share (one-line errors, exit code 2, token redaction, logging) is
ft_focal/commands/guard.py, re-exported here.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, Optional

from ft_focal.commands.guard import RedactTokens, list_flag, redact, run_guarded, setup_logging

__all__ = ["main", "COMMANDS", "USAGE", "RedactTokens", "list_flag", "redact", "run_guarded", "setup_logging"]

USAGE = """usage: ft-focal COMMAND ...   (ft-focal --version: the installed version)

commands:
  train RECIPE.yaml [key=value ...] [--dry-run]   fine-tune (same as accelerate launch -m ft_focal.train)
                  [--zero-shot]                    evaluate the initial head, no training
                  [--restart]                      start from update 0 (old checkpoints moved aside)
  eval RUN_OR_MODEL_DIR [k=v ...] [--out FILE]     long-tail accuracy (+ --imagenet-c ROOT for CE / mCE)
  corrupt RECIPE_OR_SPLIT --out DIR                render an ImageNet-C style set of a test split
  check-data RECIPE.yaml [key=value ...]           verify every image of every split
  export RUN_DIR EXPORT_DIR [--merge-lora]         Hub-ready folder (safetensors + model card)
  push RUN_OR_EXPORT_DIR REPO_ID [--private]       upload to the Hugging Face Hub
  report RUN_DIR [RUN_DIR ...]                     Markdown report / comparison of runs
  sharpness MODEL_DIR [--groups many,medium,few]   Hessian eigenvalues / trace by shot group
  wise RUN_DIR [--alphas 0:1:0.1] [--suite ...]    WiSE-FT: interpolate initial and fine-tuned model
  sweep SWEEP.yaml [key=value ...] [--storage URL] hyperparameter search (Optuna): sweep.md, best.yaml

Flags and key=value recipe overrides may come in any order.
"""


def _lazy(module: str) -> Callable[[list[str]], int]:
    def call(argv: list[str]) -> int:
        return importlib.import_module(module).main(argv)

    return call


# command -> the module of ft_focal/commands/ that runs it
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _lazy("ft_focal.commands.train"),
    "eval": _lazy("ft_focal.commands.eval"),
    "corrupt": _lazy("ft_focal.commands.corrupt"),
    "check-data": _lazy("ft_focal.commands.check_data"),
    "export": _lazy("ft_focal.commands.export"),
    "push": _lazy("ft_focal.commands.push"),
    "report": _lazy("ft_focal.commands.report"),
    "sharpness": _lazy("ft_focal.commands.sharpness"),
    "wise": _lazy("ft_focal.commands.wise"),
    "sweep": _lazy("ft_focal.commands.sweep"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        from ft_focal.version import __version__

        print(f"ft-focal {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{command}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
