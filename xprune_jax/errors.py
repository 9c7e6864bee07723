"""The one error type users see: a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input from the user. The CLI prints its message as one line and exits non-zero."""
