"""Targets by name (an explicit table: one line per target module)."""

from __future__ import annotations

from anefx.ir.errors import AnefxError
from anefx.targets.base import Target

NAMES = ("coreml", "coreai")


def target_class(name: str) -> type[Target]:
    if name == "coreml":
        from anefx.targets.coreml import CoreMLTarget

        return CoreMLTarget
    if name == "coreai":
        from anefx.targets.coreai import CoreAITarget

        return CoreAITarget
    raise AnefxError(f"unknown target {name!r}; choose 'coreml' (.mlpackage) or 'coreai' (.aimodel)")


def target_by_name(name: str, options=None) -> Target:
    """The target ``name`` with ``options`` (its ``Options`` dataclass; checked now)."""
    return target_class(name)(options)


def target_for_suffix(suffix: str) -> Target:
    """The target whose packages end with ``suffix`` (``.mlpackage``, ``.aimodel``)."""
    for name in NAMES:
        cls = target_class(name)
        if cls.suffix == suffix:
            return cls()
    raise AnefxError(f"no target writes {suffix!r} packages; anefx reads .mlpackage and .aimodel")
