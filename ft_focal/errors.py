"""One exception type for mistakes a user can fix (bad recipe key, missing file, bad label).

The command line catches `UserError` and prints its message as a single line with a non-zero
exit code, never a traceback. Library code raises it with a message that names the file / line /
key and says what is wrong.
"""


class UserError(Exception):
    """An error caused by user input; its message is one line meant for the user."""
