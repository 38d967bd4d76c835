"""One exception base for everything gradprobe raises on purpose.

Messages name the bad value and, where there is a fixed set, the valid choices, so that the CLI can
print them as one line without a traceback.
"""

from __future__ import annotations

__all__ = ["GradprobeError", "UsageError", "ProbeError"]


class GradprobeError(Exception):
    """Base class: a problem gradprobe can explain in one line (bad input, bad option, failed probe)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(GradprobeError):
    """A bad argument: unknown initializer, malformed spec, unknown option."""


class ProbeError(GradprobeError):
    """The model failed while being probed; the message names the module and what it saw."""
