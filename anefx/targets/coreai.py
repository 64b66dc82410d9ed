"""Core AI hand-off: the validated graph → Apple's ``coreai-torch`` → ``.aimodel``.

Core AI (2026) succeeds Core ML for neural networks on Apple's OS 27 and later. Route: legalize a
clone of the graph (as for Core ML) → ``torch.export`` → ``run_decompositions`` with
``coreai_torch.get_decomp_table()`` (the converter refuses non-decomposed ops such as
``aten.linear``) → ``TorchConverter().add_exported_program(ep).to_coreai()`` → ``save_asset``.

The program's ops are read by walking its MLIR graph: names (``coreai.conv2d``, ``coreai.transpose``,
``coreai.invoke`` of composites such as ``@layer_norm_…``) and the source locations coreai-torch
keeps (``file:line`` of the user's code). A saved ``.aimodel`` runs through coreai-core's runtime,
on the CPU on Linux and on Apple's OS 27 and later (:class:`CoreAIProgram`, what ``anefx.load``
returns for an ``.aimodel``).

Install with ``pip install 'anefx[coreai]'``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anefx.compat.coreai import function_graph, walk
from anefx.driver.events import Events, events_of
from anefx.ir.errors import AnefxError, ConversionError, TargetUnavailableError
from anefx.ir.ops import DECOMPOSITIONS
from anefx.targets.base import Capabilities, ConvertedFunction, Package, Target
from anefx.targets.executor import LoadedProgram, State, TensorSpec
from anefx.targets.handoff import HandOff, ProgramSpec, StateSpec, check_converter_input, legalized_clone
from anefx.targets.stateful import functional_view, stateful_module

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


def _exported(handoff: HandOff, program: ProgramSpec, coreai_torch):
    """The program coreai-torch reads for one function, the pure graph it computes (what is
    validated), and its state names. A function with states is the hand-off's graph with each state
    a buffer written in place (:func:`~anefx.targets.stateful.stateful_module`): coreai-torch makes
    each mutated buffer a Core AI state."""
    table = {**coreai_torch.get_decomp_table(), **DECOMPOSITIONS}
    try:
        if handoff.stateful:
            wrapper = stateful_module(legalized_clone(handoff), handoff, program.states)
            with torch.no_grad():
                ep = torch.export.export(wrapper, tuple(handoff.value_examples()), strict=False)
            ep = ep.run_decompositions(table)
            from torch.export.graph_signature import InputKind

            mutated = set(ep.graph_signature.buffers_to_mutate.values())
            states = [
                spec.target
                for spec in ep.graph_signature.input_specs
                if spec.kind == InputKind.BUFFER and spec.target in mutated
            ]
            return ep, functional_view(ep, handoff), states
        gm = legalized_clone(handoff)
        ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
        ep = ep.run_decompositions(table)
    except Exception as exc:
        raise ConversionError(f"re-exporting the rewritten graph failed: {type(exc).__name__}: {exc}") from exc
    return ep, ep.module(), []


def available() -> tuple[bool, str]:
    try:
        _coreai_torch()
    except TargetUnavailableError as exc:
        return False, str(exc)
    return True, "coreai-torch is installed"


RUNTIME_HINT = (
    "running .aimodel files needs coreai-core's runtime: pip install 'anefx[coreai]' "
    "(it runs them on the CPU on Linux, and on Apple's OS 27 or later)"
)


def runtime_available() -> tuple[bool, str]:
    """Whether ``.aimodel`` files can be loaded and run here (coreai-core's runtime: the CPU on
    Linux, Core AI on Apple's OS 27 or later)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coreai.authoring
            import coreai.runtime  # noqa: F401
    except ImportError:
        return False, RUNTIME_HINT
    return True, "coreai-core's runtime runs .aimodel files here"


@dataclass(frozen=True)
class CoreAIOptions:
    """Options of the Core AI hand-off (none yet beyond the converter's defaults)."""


@dataclass
class CoreAIOp:
    name: str  # e.g. "transpose", "conv2d", "invoke:layer_norm"
    location: str | None  # "file:line" of the user's code, when coreai-torch kept it


@dataclass
class CoreAIPackage(Package):
    """An ``.aimodel``: its functions (one per entry point; ``main`` for ``compile``, ``prefill`` and
    ``decode`` for ``compile_lm``), each function's ops as read from the program, and its states."""

    ops: dict[str, list[CoreAIOp]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)  #: per function, its output names
    state_specs: dict[str, StateSpec] = field(default_factory=dict)
    suffix = ".aimodel"

    def operations(self, function: str | None = None) -> list[CoreAIOp]:
        return list(self.ops[self.function(function).name])

    def op_histogram(self, function: str | None = None) -> collections.Counter:
        return collections.Counter(op.name for op in self.operations(function) if op.name not in _STRUCTURAL)

    def input_names(self, function: str | None = None) -> list[str]:
        return list(self.function(function).exported_program.graph_signature.user_inputs)

    def output_names(self, function: str | None = None) -> list[str]:
        return list(self.outputs[self.function(function).name])

    def states(self) -> dict[str, StateSpec]:
        return dict(self.state_specs)

    def _write(self, path: Path) -> None:
        self.model.save_asset(Path(path))

    def ir_text(self) -> str:
        """The program as MLIR-like text, without the weights."""
        return function_graph(self.model, self.default).get_asm(large_elements_limit=16)


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


def read_ops(program, name: str = "main") -> list[CoreAIOp]:
    """The ops of function ``name`` of a converted program, nested ones included."""
    ops: list[CoreAIOp] = []
    walk(program, lambda op: ops.append(CoreAIOp(_short_name(op), _user_location(str(op.location)))), name)
    return ops


class CoreAITarget(Target):
    name = "coreai"
    Options = CoreAIOptions
    suffix = ".aimodel"
    #: functions with states (buffers written in place: Core AI states) and several entry points in
    #: one program; no compression or chunking (yet); packages run with coreai-core
    capabilities = Capabilities(
        states=True, multiple_functions=True, program="coreai", executor="coreai", runtimes=frozenset({"coreai"})
    )

    def convert(self, program: ProgramSpec, events: Events | None = None) -> CoreAIPackage:
        self.require(states=program.stateful, functions=len(program.functions))
        events = events_of(events)
        coreai_torch = _coreai_torch()
        converter = coreai_torch.TorchConverter()
        functions: dict[str, ConvertedFunction] = {}
        several = len(program.functions) > 1
        for name, handoff in program.functions.items():
            with events.stage(name) if several else contextlib.nullcontext():
                with events.stage("export"):
                    ep, handed, states = _exported(handoff, program, coreai_torch)
                with events.stage("check_converter_input"):
                    check_converter_input(handoff, handed)
                converter.add_exported_program(
                    ep,
                    input_names=handoff.value_inputs,
                    output_names=handoff.value_outputs,
                    state_names=states,
                    entrypoint_name=name,
                )
                functions[name] = ConvertedFunction(name, None, 0.0, ep, handed)
        with events.stage("coreai_convert"):
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    converted = converter.to_coreai()
            except Exception as exc:
                raise ConversionError(f"coreai-torch failed to convert: {type(exc).__name__}: {exc}") from exc
        seconds = events.events[-1].seconds or 0.0
        for function in functions.values():
            function.model, function.seconds = converted, seconds
        return CoreAIPackage(
            functions,
            converted,
            program.default,
            dict(program.metadata),
            {name: read_ops(converted, name) for name in functions},
            {name: list(h.value_outputs) for name, h in program.functions.items()},
            dict(program.states),
        )

    def executor(self, package: CoreAIPackage, runtime: str | None = None) -> CoreAIProgram:
        """``package`` run by coreai-core's runtime: saved to a private temporary folder, removed with
        the program."""
        self.runtime(runtime)
        staged = tempfile.TemporaryDirectory(prefix="anefx-")
        return CoreAIProgram(package.save(Path(staged.name) / "model.aimodel"), keep=staged)


# ---------------------------------------------------------------------------------------------
# running a saved .aimodel: coreai-core's runtime
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr():
    """coreai-core's runtime logs each function it loads on the process's stderr (file descriptor 2)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CoreAIState(State):
    """States of an ``.aimodel`` function: coreai-core ``NDArray`` buffers the runtime updates in place."""

    def __init__(self, specs: dict[str, TensorSpec]):
        from coreai.runtime import NDArray

        self.specs = dict(specs)
        self.arrays = {n: NDArray(np.zeros(s.shape, s.dtype)) for n, s in specs.items()}

    def _read(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name].numpy(), copy=True)

    def _write(self, name: str, value: np.ndarray) -> None:
        from coreai.runtime import NDArray

        self.arrays[name] = NDArray(np.ascontiguousarray(value))


class CoreAIProgram(LoadedProgram):
    """A saved ``.aimodel`` run by coreai-core's runtime (``AIModelAsset.load(path).executable()``,
    ``load_function(name)``, ``await f(inputs, state=...)``). The runtime is asynchronous: the
    program keeps the loaded model open on an event loop of its own (a background thread), so that
    calls are plain synchronous calls, also from code that runs an event loop itself. ``close()``
    releases the model (also done when the program is garbage-collected)."""

    runtime = "coreai"

    def __init__(self, path, keep: object = None):
        ok, why = runtime_available()
        if not ok:
            raise TargetUnavailableError(why)
        from coreai.authoring import AIModelAsset

        self.source = str(path)
        self._keep = keep  #: what the program holds alive (the temporary folder of a staged package)
        path = Path(path)
        if not (path / "metadata.json").exists():
            raise AnefxError(f"cannot load {path}: not an .aimodel (no metadata.json inside)")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="anefx-coreai", daemon=True)
        self._thread.start()
        self._context = AIModelAsset.load(path).executable()
        self._model = self._await(self._context.__aenter__())
        self._functions: dict[str, Any] = {}
        with _quiet_stderr():
            for name in self._model.function_names:
                self._functions[name] = self._model.load_function(name)

    def _await(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if getattr(self, "_model", None) is not None:
            self._functions.clear()
            self._await(self._context.__aexit__(None, None, None))
            self._model = None
        if getattr(self, "_loop", None) is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    @property
    def functions(self) -> list[str]:
        return list(self._functions)

    @property
    def default_function(self) -> str:
        return "main" if "main" in self._functions else self.functions[0]

    def _specs(self, function: str | None, kind: str) -> dict[str, TensorSpec]:
        desc = self._functions[self.function_name(function)].desc
        names = getattr(desc, f"{kind}_names")
        describe = getattr(desc, f"{kind}_descriptor")
        out = {}
        for name in names:
            d = describe(name)
            out[name] = TensorSpec(tuple(int(x) for x in d.shape), np.dtype(str(d.dtype)))
        return out

    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return self._specs(function, "input")

    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return self._specs(function, "output")

    def states(self, function: str | None = None) -> dict[str, TensorSpec]:
        return self._specs(function, "state")

    def make_state(self, function: str | None = None) -> CoreAIState:
        return CoreAIState(self.states(function))

    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray

        name = self.function_name(function)
        arrays = self.checked_inputs(name, inputs)
        state = self.checked_state(name, state)
        if state is not None and not isinstance(state, CoreAIState):
            raise TypeError(f"an .aimodel runs with the state of make_state(), got a {type(state).__name__}")
        feed = {k: NDArray(np.ascontiguousarray(v)) for k, v in arrays.items()}
        buffers = {k: state.arrays[k] for k in self.states(name)} if state is not None else {}
        out = self._await(self._functions[name](feed, state=buffers))
        return {k: np.array(out[k].numpy(), copy=True) for k in self._specs(name, "output")}
