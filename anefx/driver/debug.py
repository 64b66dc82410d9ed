"""Pass-by-pass debugging switches, named after MLIR/LLVM's, with environment variables as defaults.

=============================  ===============================================================
``ANEFX_PRINT_IR_AFTER_ALL=1``  print the graph after every pass
``ANEFX_PRINT_IR_AFTER=a,b``    print the graph after the named passes
``ANEFX_PRINT_IR_BEFORE=a,b``   print the graph before the named passes
``ANEFX_PRINT_IR_AFTER_CHANGE`` print only after passes that changed the graph
``ANEFX_DUMP_DIR=<dir>``        numbered before/after code, diffs, errors, summary.json, pictures
``ANEFX_BISECT_LIMIT=N``        run only the first N pass applications; ``-1`` lists them
``ANEFX_VALIDATE=mode``         ``off``, ``lint`` or ``numeric`` (default)
=============================  ===============================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def _names(text: str | None) -> frozenset[str]:
    return frozenset(p.strip() for p in (text or "").split(",") if p.strip())


@dataclass(frozen=True)
class DebugOptions:
    print_ir_after_all: bool = False
    print_ir_after: frozenset[str] = field(default_factory=frozenset)
    print_ir_before: frozenset[str] = field(default_factory=frozenset)
    print_ir_after_change: bool = False
    dump_dir: Path | None = None
    bisect_limit: int | None = None
    #: Write a reproducer (graph before the failing pass + pipeline) here when a pass fails.
    reproducer_dir: Path | None = None
    #: No BISECT lines and no rollback messages on stderr (for tools that drive the pipeline).
    quiet: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DebugOptions:
        env = os.environ if env is None else env
        limit = env.get("ANEFX_BISECT_LIMIT")
        dump = env.get("ANEFX_DUMP_DIR")
        return cls(
            print_ir_after_all=env.get("ANEFX_PRINT_IR_AFTER_ALL", "").lower() in _TRUE,
            print_ir_after=_names(env.get("ANEFX_PRINT_IR_AFTER")),
            print_ir_before=_names(env.get("ANEFX_PRINT_IR_BEFORE")),
            print_ir_after_change=env.get("ANEFX_PRINT_IR_AFTER_CHANGE", "").lower() in _TRUE,
            dump_dir=Path(dump) if dump else None,
            bisect_limit=int(limit) if limit not in (None, "") else None,
        )

    def merged(self, **overrides) -> DebugOptions:
        clean = {k: v for k, v in overrides.items() if v is not None}
        for key in ("print_ir_after", "print_ir_before"):
            if key in clean and isinstance(clean[key], str):
                clean[key] = _names(clean[key])
            elif key in clean:
                clean[key] = frozenset(clean[key])
        for key in ("dump_dir", "reproducer_dir"):
            if key in clean:
                clean[key] = Path(clean[key])
        return dataclasses.replace(self, **clean)


def validate_mode_from_env(default: str = "numeric") -> str:
    mode = os.environ.get("ANEFX_VALIDATE", default).strip().lower() or default
    if mode not in ("off", "lint", "example", "numeric"):
        raise ValueError(f"ANEFX_VALIDATE must be off, lint, example or numeric, got {mode!r}")
    return mode
