"""The two exceptions the core raises for what a user, not a bug, caused. The run derives
every error of its own from them (run/errors.py), and the command-line tools print them as
one line with their exit_code."""


class UserError(ValueError):
    """Bad input or settings; the message is complete and fits on one line."""

    exit_code = 2


class StoppedError(UserError):
    """A run that started and had to stop (e.g. a non-finite loss): exit status 1."""

    exit_code = 1
