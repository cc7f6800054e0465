"""The exceptions that reach the user as a one-line message: bad input (exit 2), a failed run (exit 1)."""


class UserError(ValueError):
    """Bad input from the user (config, files, CLI arguments); the message is one line."""

    exit_code = 2


class RunFailed(UserError):
    """The run could not go on (a non-finite loss, a failed checkpoint save); one line, exit 1."""

    exit_code = 1


class ConfigError(UserError):
    """A config problem; its message is one line meant for the user."""


def warn(msg: str) -> None:
    """One warning line on stderr, from process 0 only (every process of a run sees the same)."""
    import sys

    import jax  # here, not above: the CLI imports this module before it knows it needs JAX

    if jax.process_index() == 0:
        print(f"jaxlm: warning: {msg}", file=sys.stderr, flush=True)
