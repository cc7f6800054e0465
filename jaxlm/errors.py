"""The exceptions that reach the user as a one-line message: bad input (exit 2), a failed run (exit 1)."""


class UserError(ValueError):
    """Bad input from the user (config, files, CLI arguments); the message is one line."""

    exit_code = 2


class RunFailed(UserError):
    """The run could not go on (a non-finite loss, a failed checkpoint save); one line, exit 1."""

    exit_code = 1


class ConfigError(UserError):
    """A config problem; its message is one line meant for the user."""
