"""The one exception type that reaches a user as a single line, not a traceback."""


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
