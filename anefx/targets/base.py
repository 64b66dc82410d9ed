"""The hand-off interface: a rewritten canonical graph in, a deployable artifact out.

A target is one small module: ``convert(handoff) -> Artifact``. The artifact can ``save(path)`` and
report an ``op_histogram()`` of the converted program, so tests and benchmarks compare structure
the same way for every target.
"""

from __future__ import annotations

import abc
import collections
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx

from anefx.errors import AnefxError


@dataclass
class HandOff:
    """What a target gets: the validated graph and how to call it."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    input_names: list[str]
    output_names: list[str]


@dataclass
class Artifact(abc.ABC):
    """A converted model. ``model`` is the target library's object (``ct.models.MLModel`` …)."""

    model: Any
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    suffix: ClassVar[str] = ""

    @abc.abstractmethod
    def op_histogram(self) -> collections.Counter:
        """How often each op occurs in the converted program."""

    @abc.abstractmethod
    def _write(self, path: Path) -> None:
        """Write the artifact to ``path`` (which does not exist yet)."""

    def save(self, path) -> Path:
        """Write to ``path`` atomically: nothing half-written is left behind on failure."""
        path = Path(path)
        if self.suffix and path.suffix != self.suffix:
            raise AnefxError(f"{type(self).__name__} must be saved with the {self.suffix} suffix, got {path.name!r}")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            raise AnefxError(f"cannot save to {path}: the directory {parent} does not exist")
        if not parent.is_dir():
            raise AnefxError(f"cannot save to {path}: {parent} is not a directory")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".anefx-", dir=parent))
        except OSError as exc:
            raise AnefxError(f"cannot save to {path}: {parent} is not writable ({exc.strerror})") from exc
        try:
            staged = tmp / path.name
            self._write(staged)
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            staged.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


def legalized_clone(handoff: HandOff) -> torch.fx.GraphModule:
    """A clone of the validated graph spelled the way converters accept (ops respelled, constants
    folded): each target legalizes for itself, and the compiled graph is never touched."""
    from anefx.graph import clone_graph_module
    from anefx.legalize import canonicalize, fold_constants

    gm = clone_graph_module(handoff.graph_module)
    canonicalize(gm)
    fold_constants(gm)
    gm.recompile()
    return gm


class Target(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @abc.abstractmethod
    def convert(self, handoff: HandOff) -> Artifact:
        """Convert the validated graph; raise ``ConversionError`` naming the op and source line."""
