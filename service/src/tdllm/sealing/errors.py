"""The one error a sealed model raises when it cannot be opened."""

from __future__ import annotations

from tdllm.errors import ModelLoadError


class SealedModelError(ModelLoadError):
    """A sealed model could not be opened.

    Deliberately says only *what* failed (a tensor or "manifest"), never *why*: a wrong key, a
    flipped bit, a reordered chunk and a truncated file all read the same, so the error cannot
    serve as an oracle (the Fernet `InvalidToken` rule; docs/sealed-format.md).
    """

    def __init__(self, source: object, what: str) -> None:
        super().__init__(f"{source}: cannot unseal {what} (wrong key, or damaged files)")
        self.what = what


class SealedModelMismatch(SealedModelError):  # noqa: N818  # reads as the event
    """The manifest authenticated, but it is another model or version than the key was released
    for (a rollback, or a model swapped on the host's disk).

    Raised only after the MAC has verified, by a caller that holds the key: no oracle, so the
    message may say what differs.
    """

    def __init__(self, source: object, found: str, expected: str) -> None:
        ModelLoadError.__init__(
            self, f"{source}: the sealed model is {found}, but its key was released for {expected}"
        )
        self.what = "manifest"
