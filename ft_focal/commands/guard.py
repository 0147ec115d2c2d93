"""What every `ft-focal` command shares: logging set-up, token redaction, one-line errors, list flags.

User mistakes (`UserError`, a missing file, a bad key) end with ONE line on stderr and exit
code 2; no traceback. Set FT_FOCAL_DEBUG=1 to see the traceback of an error anyway.

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


class BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through `tqdm.write`: an open progress bar on the same stream
    is cleared first and redrawn after, so a log line never lands on the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # the handler's own error path, as logging.StreamHandler does
            self.handleError(record)


def process_rank() -> int:
    """This process's rank under torchrun / `accelerate launch` (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def setup_logging() -> None:
    """INFO lines on the main process only (every process of a multi-process run would print each
    one); warnings and errors on every process, since they may be about that process alone."""
    root = logging.getLogger()
    if not root.handlers:
        handler = BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    if process_rank() != 0:
        root.setLevel(logging.WARNING)
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
