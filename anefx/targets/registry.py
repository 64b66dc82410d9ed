"""Target lookup by name (an explicit table: one line per target module)."""

from __future__ import annotations

from anefx.ir.errors import AnefxError
from anefx.targets.base import Target


def target_by_name(name: str, options=None) -> Target:
    if name == "coreml":
        from anefx.targets.coreml import CoreMLTarget

        return CoreMLTarget(options)
    if name == "coreai":
        from anefx.targets.coreai import CoreAITarget

        return CoreAITarget(options)
    raise AnefxError(f"unknown target {name!r}; choose 'coreml' (.mlpackage) or 'coreai' (.aimodel)")
