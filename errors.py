"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input or environment: printed as one line that says what to do, exit code 2, no traceback."""
