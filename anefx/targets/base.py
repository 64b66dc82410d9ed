"""The target interface: what a target can do, how it converts a program, and what it makes.

A target (:class:`Target`) converts a :class:`~anefx.targets.handoff.ProgramSpec` (one hand-off per
function, and the program's states) into a :class:`Package`: the file the target's runtime loads
(``.mlpackage``, ``.aimodel``) with one :class:`ConvertedFunction` per function. Callers never test
a target's name: they ask its :class:`Capabilities` (states, several functions in one package,
compression schemes, chunking and its default size cap, its executor).

Each target names what runs its packages outside PyTorch (:meth:`Target.executor`): a
:class:`~anefx.targets.executor.LoadedProgram`, the interface ``anefx.load`` returns (Core ML: anefx's
MIL interpreter, or Core ML itself on macOS; Core AI: coreai-core's runtime).
"""

from __future__ import annotations

import abc
import collections
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.fx

from anefx.driver.events import Events
from anefx.ir.errors import AnefxError, TargetUnavailableError
from anefx.targets.executor import LoadedProgram
from anefx.targets.handoff import ProgramSpec, StateSpec


class Schemes(Protocol):
    """A compression request (``CompressionOptions``) as a target sees it: the schemes it asks for."""

    def schemes(self) -> set[str]: ...


@dataclass(frozen=True)
class Capabilities:
    """What a target can do. ``states``: functions that read and write states in place (KV caches);
    ``multiple_functions``: several functions sharing weights in one package; ``compression``: the
    scheme names it ships; ``chunks``: whether it splits a program into a chain of packages under a
    size cap (:meth:`Target.default_cap_mb`); ``executor``: the runtime that runs its packages by
    default (:meth:`Target.executor`: ``"mil"``, ``"coreai"``; None: nothing yet), ``runtimes``
    every runtime that can (the names ``anefx.load`` takes)."""

    states: bool = False
    multiple_functions: bool = False
    compression: frozenset[str] = frozenset()
    chunks: bool = False
    executor: str | None = None
    runtimes: frozenset[str] = frozenset()
    #: the converted program's form: ``"mil"`` (a Core ML MIL program, which the ANE report reads)
    program: str = ""


@dataclass
class ConvertedFunction:
    """One function of a package: the target's object for it and what the converter read."""

    name: str
    model: Any  #: the target's object for this function alone (a ``ct.models.MLModel`` …)
    seconds: float = 0.0
    #: the program the converter read (its node names are the converted program's op names)
    exported_program: torch.export.ExportedProgram | None = field(default=None, repr=False)
    #: the graph handed to the converter as a pure function of the hand-off's signature, as validated
    converter_input: torch.fx.GraphModule | None = field(default=None, repr=False)
    #: ``exported_program``'s parameter names → the user's parameter names
    param_name: Callable[[str], str] | None = field(default=None, repr=False)

    @property
    def exported_graph(self) -> torch.fx.GraphModule | None:
        return self.exported_program.graph_module if self.exported_program is not None else None

    def user_param_name(self, name: str) -> str:
        return self.param_name(name) if self.param_name is not None else name


@dataclass
class Package(abc.ABC):
    """A converted program: its functions (sharing weights) and states, as one file on disk."""

    functions: dict[str, ConvertedFunction]
    model: Any  #: the target's object for the whole package
    default: str = ""  #: the function a runtime calls by default
    metadata: dict[str, str] = field(default_factory=dict)

    suffix: ClassVar[str] = ""

    def __post_init__(self):
        if not self.default:
            self.default = next(iter(self.functions))

    def function(self, name: str | None = None) -> ConvertedFunction:
        name = name or self.default
        if name not in self.functions:
            raise KeyError(f"no function {name!r}; this package has {list(self.functions)}")
        return self.functions[name]

    @property
    def exported_program(self):
        return self.function().exported_program

    @property
    def exported_graph(self):
        return self.function().exported_graph

    @property
    def converter_input(self) -> torch.fx.GraphModule | None:
        return self.function().converter_input

    @abc.abstractmethod
    def operations(self, function: str | None = None) -> list:
        """The converted program's ops of one function (the default one without a name)."""

    @abc.abstractmethod
    def op_histogram(self, function: str | None = None) -> collections.Counter:
        """How often each op occurs in one function of the converted program."""

    @abc.abstractmethod
    def _write(self, path: Path) -> None:
        """Write the package to ``path`` (which does not exist yet)."""

    @abc.abstractmethod
    def input_names(self, function: str | None = None) -> list[str]:
        """The names one function of the package takes (states excluded)."""

    @abc.abstractmethod
    def output_names(self, function: str | None = None) -> list[str]:
        """The names one function of the package returns (states excluded)."""

    def states(self) -> dict[str, StateSpec]:
        """The package's states (none unless the target has states)."""
        return {}

    def weight_bytes(self) -> int:
        """Bytes of the weights :meth:`save` writes."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.weight_bytes_at(self.save(Path(tmp) / f"package{self.suffix}"))

    @staticmethod
    def weight_bytes_at(path: Path) -> int:
        """Bytes of the weights of a saved package (every file, unless the target knows better)."""
        path = Path(path)
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size

    def save(self, path) -> Path:
        """Write to ``path`` atomically: nothing half-written is left behind on failure."""
        path = Path(path)
        if self.suffix and path.suffix != self.suffix:
            raise AnefxError(f"{type(self).__name__} must be saved with the {self.suffix} suffix, got {path.name!r}")
        return write_atomically(path, self._write)


class Target(abc.ABC):
    """A hand-off: converts a validated program into a package. Subclasses declare ``name``,
    ``Options`` (a frozen dataclass, checked when the target is made), ``suffix`` and
    ``capabilities``."""

    name: ClassVar[str]
    Options: ClassVar[type]
    suffix: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @property
    def precision(self) -> str:
        """The compute precision of what this target ships (``float16`` or ``float32``)."""
        return "float16"

    def default_cap_mb(self) -> float | None:
        """The package size above which a program is split into a chain (None: this target does not
        split)."""
        return None

    def for_program(self, *, states: bool = False, functions: int = 1) -> Target:
        """This target, able to hold a program with ``functions`` functions and (``states``) states (a
        target may raise its deployment target for them), or an ``AnefxError`` saying what is missing."""
        self.require(states=states, functions=functions)
        return self

    def require(self, *, states: bool = False, functions: int = 1) -> None:
        """Refuse, with what is missing, a program this target cannot hold."""
        caps = self.capabilities
        if states and not caps.states:
            raise AnefxError(f"the {self.name} target has no states (KV caches …) in anefx yet; use target='coreml'")
        if functions > 1 and not caps.multiple_functions:
            raise AnefxError(
                f"the {self.name} target holds one function per package in anefx; a program with {functions} "
                "functions needs target='coreml'"
            )

    def with_fp32_nodes(self, nodes) -> Target | None:
        """This target with the ops converted from the torch nodes ``nodes`` computed in fp32 in an
        fp16 program (the artifact check's fallback for a region that overflows); None when the
        target cannot choose the precision of single ops."""
        return None

    def for_compression(self, compression: Schemes, explicit_options: bool) -> Target:
        """This target, able to hold ``compression`` (a target whose options were not given may raise
        its deployment target for it), or an ``AnefxError`` saying why it cannot, before any work."""
        schemes = compression.schemes()
        missing = sorted(schemes - self.capabilities.compression)
        if missing:
            raise AnefxError(
                f"compression {missing} is not available for target={self.name!r} "
                f"(it ships {sorted(self.capabilities.compression) or 'no compression'}); use target='coreml' "
                "or compression=None"
            )
        return self

    @abc.abstractmethod
    def convert(self, program: ProgramSpec, events: Events | None = None) -> Package:
        """Convert every function of ``program``; raise ``ConversionError`` naming the op and source line."""

    def package(self, functions: dict[str, ConvertedFunction], program: ProgramSpec) -> Package:
        """A package of already converted functions (after compression replaced their models)."""
        raise AnefxError(f"the {self.name} target cannot repackage converted functions")

    def runtime(self, runtime: str | None = None) -> str:
        """``runtime`` checked against the runtimes that run this target's packages (``None`` or
        ``"auto"``: its default executor)."""
        caps = self.capabilities
        if runtime in (None, "auto"):
            if caps.executor is None:
                raise TargetUnavailableError(f"nothing runs {self.name} packages yet")
            return caps.executor
        if runtime not in caps.runtimes:
            raise AnefxError(
                f"{self.name} packages run with runtime {sorted(caps.runtimes)} (default {caps.executor!r}), "
                f"not {runtime!r}"
            )
        return runtime

    def executor(self, package: Package, runtime: str | None = None) -> LoadedProgram:
        """``package`` ready to run outside PyTorch with ``runtime`` (default: ``capabilities.executor``);
        ``TargetUnavailableError`` with the reason when that runtime cannot run here."""
        raise TargetUnavailableError(f"nothing runs {self.name} packages yet")

    def load(self, path: Path) -> Package:
        """A package saved by this target, read back (its functions' models, no exported programs)."""
        raise AnefxError(f"the {self.name} target cannot read packages back yet")


def write_atomically(path: Path, write) -> Path:
    """``write(staged)`` into a private folder next to ``path``, then rename the result to ``path``
    (replacing what was there): on any failure nothing is left behind and ``path`` is untouched."""
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
        write(staged)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        staged.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
