"""`ft-focal train RECIPE.yaml [key=value ...] [--dry-run] [--zero-shot]`: fine-tune a recipe
(ft_focal/training/trainer.py).

Same as `accelerate launch -m ft_focal.train RECIPE.yaml [key=value ...]`. `--dry-run` runs the
recipe small instead (ft_focal/commands/dry_run.py); `--zero-shot` evaluates the initial head
without training, into `<output_dir>_zero_shot` (ft_focal/training/zero_shot.py). `--restart` starts from
update 0 after moving existing checkpoints aside (never deleted). A run stopped by SIGTERM /
SIGUSR1 writes a checkpoint, prints one line and exits with code 75 (ft_focal/training/run_control.py).
"""

from __future__ import annotations

import sys
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded
from ft_focal.config import load_recipe


def main(argv: Optional[list[str]] = None) -> int:
    return run_guarded(lambda: _run(argv))


def build_parser() -> CommandParser:
    """The parser of `ft-focal train` and `[accelerate launch] python -m ft_focal.train`."""
    parser = CommandParser(prog="ft-focal train", description="Fine-tune a model from a recipe.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny backbone of the same family + synthetic images: build everything, 2 updates, 1 eval")
    parser.add_argument("--zero-shot", action="store_true", help="no training: evaluate the initial (text or "
                        "class-mean) head; writes to <output_dir>_zero_shot")
    parser.add_argument("--restart", action="store_true", help="start from update 0: move the output_dir's "
                        "checkpoints (and best model) aside into output_dir/previous_<time>/ instead of resuming")
    return parser


def _run(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_command(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.zero_shot:
        from ft_focal.training.zero_shot import zero_shot_recipe

        recipe = zero_shot_recipe(recipe)
    if args.dry_run:
        from ft_focal.commands.dry_run import dry_run

        dry_run(recipe)
        return 0
    from ft_focal.training.run_control import PREEMPTED_EXIT_CODE, Preempted
    from ft_focal.training.trainer import train

    try:
        train(recipe, restart=args.restart)
    except Preempted as stop:
        print(f"{stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
