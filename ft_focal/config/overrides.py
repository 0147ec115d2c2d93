"""The YAML engine shared by recipes (config.py) and evaluation suites (evaluation/suites.py):
reading a YAML mapping, `key=value` / `section.key=value` overrides, and the closest-key hint of
an unknown-key error. Every failure is a one-line `UserError` naming the file or the key."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from ft_focal.errors import UserError


def closest(name: str, options: list[str], prefix: str = "") -> str:
    """The hint appended to an unknown-key error: the closest option, else the valid ones, each
    written in full (`prefix` is the section, e.g. "optim.": the hint says `optim.rho`, not `rho`)."""
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{prefix}{match[0]}'?)"
    return f" (valid: {', '.join(prefix + o for o in sorted(options))})"


def parse_override(text: str, where: str = "", example: str = "optim.lr=0.01") -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value); the value is parsed as YAML (`1e-3`, `[1, 2]`, `null`).

    `where` prefixes the error (a file); `example` is the override the error shows.
    """
    if "=" not in text:
        raise UserError(f"{where}override '{text}' must look like key=value (e.g. {example})")
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 5e-4 as a string (no dot); accept it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def apply_overrides(raw: dict, overrides: list[str], where: Optional[str] = None,
                    example: str = "optim.lr=0.01") -> dict:
    """A copy of `raw` with the `key=value` / `section.key=value` overrides set (recipes and
    evaluation suites: both are mappings of keys and one level of sections). `where` (a file)
    prefixes the errors."""
    prefix = f"{where}: " if where else ""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        key, value = parse_override(text, prefix, example)
        parts = key.split(".")
        if len(parts) == 1:
            raw[parts[0]] = value
        elif len(parts) == 2:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise UserError(f"{prefix}override '{key}': '{parts[0]}' is not a section")
            section[parts[1]] = value
        else:
            raise UserError(f"{prefix}override '{key}': keys have the form section.key")
    return raw


def read_yaml(path: str | os.PathLike, what: str = "recipe file") -> dict:
    """The YAML mapping of a file (recipe, evaluation suite); a one-line UserError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    return raw or {}
