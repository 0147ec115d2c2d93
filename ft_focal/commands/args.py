"""The command-line parser every `ft-focal` command uses: argparse, with flags and `key=value`
recipe overrides in any order, and one-line errors.

argparse alone cannot mix an open list of positional overrides with flags: once a flag sits
between the overrides, the tokens after it are "unrecognized arguments". `CommandParser` takes
every token shaped like `section.key=value` out of the line first (unless it is the value of a
flag that takes one, e.g. `--message lr=0.1`), parses the rest strictly, and hands the overrides
back in their order as `args.overrides` (a later override of the same key wins). An unknown
`--flag`, a missing argument or a bad value is one line (`UserError`), as every other user error.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

from ft_focal.errors import UserError

# `key=value` / `section.key=value`: a recipe override (paths contain '/' before any '=', so a
# path is never taken for one).
OVERRIDE_SHAPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def is_override(token: str) -> bool:
    """Whether a command-line token is a `key=value` override."""
    return bool(OVERRIDE_SHAPE.match(token))


class CommandParser(argparse.ArgumentParser):
    """argparse for one `ft-focal` command: `parse_command(argv)` returns the namespace with
    `.overrides` (a list of `key=value` strings, possibly empty).

    `overrides=False`: the command takes no recipe overrides, and a `key=value` token is an error
    that says so.
    """

    def __init__(self, *args, overrides: bool = True, **kwargs) -> None:
        if overrides:
            note = "key=value recipe overrides (e.g. data.root=/data optim.lr=0.005) may stand anywhere on the line."
            kwargs["epilog"] = f"{kwargs['epilog']}\n\n{note}" if kwargs.get("epilog") else note
        super().__init__(*args, **kwargs)
        self.accepts_overrides = overrides

    def error(self, message: str) -> None:  # argparse's own errors (unknown flag, missing argument)
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")

    def _flags_taking_one_value(self) -> set[str]:
        return {flag for action in self._actions if action.option_strings and action.nargs in (None, 1, "?")
                for flag in action.option_strings}

    def parse_command(self, argv: Optional[list[str]] = None) -> argparse.Namespace:
        """Parse a command line with flags, positionals and `key=value` overrides in any order."""
        argv = list(sys.argv[1:] if argv is None else argv)
        single = self._flags_taking_one_value()
        rest: list[str] = []
        overrides: list[str] = []
        value_expected = False
        for position, token in enumerate(argv):
            if token == "--":  # everything after `--` is positional, as argparse has it
                rest += argv[position:]
                break
            if value_expected:
                rest.append(token)
                value_expected = False
            elif is_override(token):
                overrides.append(token)
            else:
                rest.append(token)
                value_expected = token in single
        args = self.parse_args(rest)
        if overrides and not self.accepts_overrides:
            self.error(f"takes no key=value recipe overrides (got '{overrides[0]}')")
        args.overrides = overrides
        return args

