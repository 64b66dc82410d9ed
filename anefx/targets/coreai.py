"""Core AI hand-off: the validated graph → Apple's ``coreai-torch`` → ``.aimodel``.

Core AI (2026) succeeds Core ML for neural networks on Apple's OS 27 and later. Route: legalize a
clone of the graph (as for Core ML) → ``torch.export`` → ``run_decompositions`` with
``coreai_torch.get_decomp_table()`` (the converter refuses non-decomposed ops such as
``aten.linear``) → ``TorchConverter().add_exported_program(ep).to_coreai()`` → ``save_asset``.

The program's ops are read by walking its MLIR graph: names (``coreai.conv2d``, ``coreai.transpose``,
``coreai.invoke`` of composites such as ``@layer_norm_…``) and the source locations coreai-torch
keeps (``file:line`` of the user's code). Loading and running an ``.aimodel``
(``coreai.runtime.AIModel``) needs Apple's OS; :func:`runtime_available` says so elsewhere.

Install with ``pip install 'anefx[coreai]'``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anefx.compat.coreai import function_graph, walk
from anefx.ir.errors import ConversionError, TargetUnavailableError
from anefx.ir.ops import DECOMPOSITIONS
from anefx.targets.base import Artifact, HandOff, Target, check_converter_input, legalized_clone

INSTALL_HINT = (
    "the Core AI target needs the optional extra: pip install 'anefx[coreai]' "
    "(coreai-torch 0.4.3 and coreai-core 1.0.0b3)"
)
_LOC = re.compile(r'loc\("([^"]+)":(\d+)')


def _coreai_torch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coreai_torch
    except ImportError as exc:
        raise TargetUnavailableError(INSTALL_HINT) from exc
    return coreai_torch


def available() -> tuple[bool, str]:
    try:
        _coreai_torch()
    except TargetUnavailableError as exc:
        return False, str(exc)
    return True, "coreai-torch is installed"


def runtime_available() -> tuple[bool, str]:
    """Whether ``.aimodel`` files can be loaded and run here."""
    if platform.system() != "Darwin":
        return False, f"running Core AI models needs Apple's OS 27 or later (this is {platform.system()})"
    try:
        import coreai.runtime  # noqa: F401
    except ImportError:
        return False, "coreai.runtime is not available in this environment"
    return True, "Core AI runtime available"


@dataclass(frozen=True)
class CoreAIOptions:
    """Options of the Core AI hand-off (none yet beyond the converter's defaults)."""


@dataclass
class CoreAIOp:
    name: str  # e.g. "transpose", "conv2d", "invoke:layer_norm"
    location: str | None  # "file:line" of the user's code, when coreai-torch kept it


@dataclass
class CoreAIArtifact(Artifact):
    ops: list[CoreAIOp] = field(default_factory=list)
    suffix = ".aimodel"

    def op_histogram(self) -> collections.Counter:
        return collections.Counter(op.name for op in self.ops if op.name not in _STRUCTURAL)

    def _write(self, path: Path) -> None:
        self.model.save_asset(Path(path))

    def ir_text(self) -> str:
        """The program as MLIR-like text, without the weights."""
        return function_graph(self.model).get_asm(large_elements_limit=16)


_STRUCTURAL = {"constant", "graph", "output"}


def _short_name(op) -> str:
    name = op.name.removeprefix("coreai.")
    if name == "invoke":
        for attr in op.attributes:
            if attr.name == "callee":
                m = re.search(r"@([A-Za-z_]+?)(?:_[a-z0-9]{6,})?>", str(attr.attr))
                if m:
                    return f"invoke:{m.group(1)}"
    return name


def _user_location(text: str) -> str | None:
    found = _LOC.findall(text)
    for path, line in found:
        if "site-packages" not in path and path != "-":
            return f"{path}:{line}"
    return f"{found[0][0]}:{found[0][1]}" if found and found[0][0] != "-" else None


def read_ops(program) -> list[CoreAIOp]:
    ops: list[CoreAIOp] = []
    walk(program, lambda op: ops.append(CoreAIOp(_short_name(op), _user_location(str(op.location)))))
    return ops


class CoreAITarget(Target):
    name = "coreai"
    Options = CoreAIOptions

    def convert(self, handoff: HandOff) -> CoreAIArtifact:
        coreai_torch = _coreai_torch()
        gm = legalized_clone(handoff)
        t0 = time.perf_counter()
        try:
            ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
            ep = ep.run_decompositions({**coreai_torch.get_decomp_table(), **DECOMPOSITIONS})
        except Exception as exc:
            raise ConversionError(f"re-exporting the rewritten graph failed: {type(exc).__name__}: {exc}") from exc
        handed = ep.module()
        check_converter_input(handoff, handed)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = coreai_torch.TorchConverter().add_exported_program(ep).to_coreai()
        except Exception as exc:
            raise ConversionError(f"coreai-torch failed to convert: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - t0
        return CoreAIArtifact(
            model=program,
            seconds=seconds,
            info={"convert_seconds": seconds},
            converter_input=handed,
            ops=read_ops(program),
        )
