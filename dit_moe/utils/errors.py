"""The errors that mean bad input: entry points show their message as one line, without a traceback."""

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input the user can fix; its message is one sentence saying how."""


class CheckpointError(UserError):
    """A file that is not a checkpoint this package can read."""
