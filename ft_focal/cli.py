"""`ft-focal train|eval|corrupt|check-data|export|push|report|sharpness` — thin dispatch.

Each subcommand calls one library function. User mistakes (`UserError`, a missing file, a bad
key) end with ONE line on stderr and exit code 2; no traceback. Set FT_FOCAL_DEBUG=1 to see
the traceback of an error anyway.

A Hugging Face token never reaches the terminal or a log through ft_focal: the error line and
every log record are passed through `redact`, which masks the values of HF_TOKEN /
HUGGING_FACE_HUB_TOKEN and anything shaped like a Hub token (`hf_` + 20 or more characters),
in case a library echoes one in an exception message.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, Optional

from ft_focal.errors import UserError

USAGE = """usage: ft-focal COMMAND ...

commands:
  train RECIPE.yaml [key=value ...] [--dry-run]   fine-tune (same as accelerate launch -m ft_focal.train)
                  [--zero-shot]                    evaluate the initial head, no training
  eval MODEL_DIR [key=value ...] [--out FILE]      long-tail accuracy (+ --imagenet-c ROOT for CE / mCE)
  corrupt RECIPE_OR_SPLIT --out DIR                render an ImageNet-C style set of a test split
  check-data RECIPE.yaml [key=value ...]           verify every image of every split
  export RUN_DIR EXPORT_DIR [--merge-lora]         Hub-ready folder (safetensors + model card)
  push RUN_OR_EXPORT_DIR REPO_ID [--private]       upload to the Hugging Face Hub
  report RUN_DIR [RUN_DIR ...]                     Markdown report / comparison of runs
  sharpness MODEL_DIR [--groups many,medium,few]   Hessian eigenvalues / trace by shot group
"""


TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


def redact(text: str) -> str:
    """`text` with any Hugging Face token masked."""
    for var in TOKEN_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if len(value) >= 8:
            text = text.replace(value, "***")
    return _TOKEN_SHAPE.sub("hf_***", text)


class RedactTokens(logging.Filter):
    """Logging filter masking tokens in the formatted message (installed on the root handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(fn: Callable[[], int]) -> int:
    """Run `fn`, turning user errors into one line on stderr and exit code 2."""
    setup_logging()
    try:
        return int(fn() or 0)
    except UserError as exc:
        if os.environ.get("FT_FOCAL_DEBUG"):
            raise
        lines = str(exc).strip().splitlines() or ["(no message)"]
        line = lines[-1] if len(lines) > 1 and "Traceback" in lines[0] else lines[0]
        print(redact(f"error: {line}"), file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        if os.environ.get("FT_FOCAL_DEBUG"):
            raise
        print(redact(f"error: {exc.filename or ''}: {exc.strerror or exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def list_flag(values: Optional[list[str]], convert: Callable[[str], Any], flag: str) -> Optional[list]:
    """A list flag's values given either way, `--flag 1,3,5` or `--flag 1 3 5` (or mixed)."""
    if values is None:
        return None
    items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UserError(f"{flag}: cannot read {' '.join(values)!r} as a list of {convert.__name__} "
                        f"(write e.g. {flag} 1,3,5 or {flag} 1 3 5)") from None


def _lazy(module: str) -> Callable[[list[str]], int]:
    def call(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return call


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _lazy("ft_focal.train"),
    "eval": _lazy("ft_focal.evaluate"),
    "corrupt": _lazy("ft_focal.commands.corrupt"),
    "check-data": _lazy("ft_focal.commands.check_data"),
    "export": _lazy("ft_focal.hub"),
    "push": _lazy("ft_focal.commands.push"),
    "report": _lazy("ft_focal.report"),
    "sharpness": _lazy("ft_focal.commands.sharpness"),
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{command}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
