"""anefx's passes, listed explicitly (no registry filled by import side effects).

``DEFAULT_PASSES`` is the order ``Pipeline.default()`` runs them in; ``ALL_PASSES`` adds passes that
are available but not on by default.
"""

from __future__ import annotations

from anefx.passes.base import NoOptions, Pass, PassContext, PassResult
from anefx.passes.canonicalize import Canonicalize
from anefx.passes.fold_constants import FoldConstants

DEFAULT_PASSES: tuple[type[Pass], ...] = (
    Canonicalize,
    FoldConstants,
)

ALL_PASSES: tuple[type[Pass], ...] = DEFAULT_PASSES


def default_passes() -> list[Pass]:
    """Fresh instances of the default passes, in order."""
    return [cls() for cls in DEFAULT_PASSES]


def pass_by_name(name: str, **options) -> Pass:
    for cls in ALL_PASSES:
        if cls.name == name:
            return cls(**options)
    raise KeyError(f"unknown pass {name!r}; available: {[c.name for c in ALL_PASSES]}")


__all__ = [
    "ALL_PASSES",
    "DEFAULT_PASSES",
    "Canonicalize",
    "FoldConstants",
    "NoOptions",
    "Pass",
    "PassContext",
    "PassResult",
    "default_passes",
    "pass_by_name",
]
