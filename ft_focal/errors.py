"""One exception type for mistakes a user can fix (bad recipe key, missing file, bad label),
and the one way an exception is shortened to a line.

The command line catches `UserError` and prints its message as a single line with a non-zero
exit code, never a traceback (ft_focal/commands/guard.py). Library code raises it with a message
that names the file / line / key and says what is wrong; where it quotes another library's
exception it uses `one_line(exc)`.
"""

ONE_LINE_LIMIT = 300


class UserError(Exception):
    """An error caused by user input; its message is one line meant for the user."""


def one_line(exc: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """`exc`'s message on one line (all whitespace runs collapsed to one space), at most `limit`
    characters; the exception's type name when the message is empty."""
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


def unwrap_worker_error(exc: UserError) -> UserError:
    """A DataLoader worker re-raises as UserError('Caught UserError in worker...\\n<traceback>');
    keep only the original one-line message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return exc
    msg = lines[-1]
    for prefix in ("ft_focal.errors.UserError:", "UserError:"):
        if msg.startswith(prefix):
            msg = msg[len(prefix):].strip()
    return UserError(msg)
