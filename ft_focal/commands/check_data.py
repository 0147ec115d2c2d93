"""`ft-focal check-data RECIPE.yaml [key=value ...] [--workers N]`: verify every image of every split.

Lists ALL problems at once (file: what is wrong) and exits 1 when there is any, 0 when clean.
"""

from __future__ import annotations

import sys
from typing import Optional

from ft_focal.commands.args import CommandParser
from ft_focal.commands.guard import run_guarded
from ft_focal.config import load_recipe


def main(argv: Optional[list[str]] = None) -> int:
    def run() -> int:
        from ft_focal.data.check import check_data

        parser = CommandParser(prog="ft-focal check-data", description=__doc__)
        parser.add_argument("recipe")
        parser.add_argument("--workers", type=int, default=4)
        args = parser.parse_command(argv)
        recipe = load_recipe(args.recipe, args.overrides)
        problems = check_data(recipe.data, args.workers)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} problem(s) found" if problems else "all images readable")
        return 1 if problems else 0

    return run_guarded(run)
