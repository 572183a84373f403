"""The one exception type the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input or environment: printed as one line that says what to do, exit code 2, no traceback."""


def check_at_least(minimum: int = 1, **values: int | None) -> None:
    """Fail with one line if any named count (flag name = keyword) is below `minimum`; None means unset."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise UserError(f"--{name} must be >= {minimum}, got {value}")
