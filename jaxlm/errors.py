"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (config, files, CLI arguments); the message is one line."""
