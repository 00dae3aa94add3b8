"""The error base of the tdllm distribution.

Anything a user, the host or the network can trigger raises a `TdllmError` subclass with a
message meant for people; the CLI prints it on one line and exits non-zero. Internal invariants in
numeric code use `assert` instead.
"""


class TdllmError(Exception):
    """Base of every error tdllm raises on purpose."""

    exit_code = 1

    def diagnostics(self) -> str:
        """One line for people (the CLI prints it as `error: ...`)."""
        return str(self)


class UsageError(TdllmError):
    """The caller asked for something that cannot work (bad option, prompt too long, ...)."""

    exit_code = 2


class ModelLoadError(TdllmError):
    """A model file or directory is missing, unreadable, or not a model we can run."""

    exit_code = 3
