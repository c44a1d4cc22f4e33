"""The one exception type a user mistake raises.

The CLI turns a :class:`CpvsError` into a single message and exit code 2; library
callers can catch it like any other exception.
"""

from __future__ import annotations

from pathlib import Path


class CpvsError(Exception):
    """Bad input or a failed precondition, explained for the user.

    ``path`` names the offending file or folder; ``hint`` says what to do.
    """

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = self.message
        if self.path and self.path not in text:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text}\n  fix: {self.hint}"
        return text


class CpvsWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as ``warning:``)."""


def warn(message: str, path: str | Path | None = None, hint: str | None = None) -> None:
    import warnings

    text = CpvsError(message, path, hint).render()
    warnings.warn(CpvsWarning(text), stacklevel=2)
