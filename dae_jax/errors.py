"""The one exception type that reaches a user as a single line, not a traceback, and
how any exception becomes such a line. Standard library only (the crash guard uses it)."""


class UserError(Exception):
    """A mistake the user can fix: bad config, missing data, unusable workdir.

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``
    (2 for usage errors, the Unix convention; 1 for everything else).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(UserError):
    """Training stopped on request (SIGINT/SIGTERM) after saving a checkpoint."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``error``'s message (its type's name when it has
    none), cut to ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException) -> str:
    """All of ``error``'s message on one line (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def with_type(error: BaseException, limit: int = 200) -> str:
    """``Type: first line`` (``Type`` alone when the message is empty)."""
    name = type(error).__name__
    return f"{name}: {first_line(error, limit)}" if str(error).strip() else name
