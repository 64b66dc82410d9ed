"""anefx's exceptions: every one says what failed, where, and what to do about it."""

from __future__ import annotations


class AnefxError(Exception):
    """Base class of every error anefx raises on purpose."""


class CaptureError(AnefxError):
    """The model (or its example inputs) could not be turned into the canonical graph."""


class PassError(AnefxError):
    """A pass raised; carries the pass name and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str, ran_before: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.ran_before = ran_before


class PipelineOrderError(AnefxError, ValueError):
    """A pipeline puts a pass before one it must run after (``Pass.runs_after``)."""


class ConversionError(AnefxError):
    """The hand-off to a target (coremltools, coreai-torch) failed."""


class TargetUnavailableError(AnefxError):
    """A target's optional dependency is missing, or it needs another OS."""
