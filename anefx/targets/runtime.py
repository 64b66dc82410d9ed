"""``anefx.load(path)``: a saved program, ready to run, whichever executor runs it here.

| what                         | ``runtime="auto"`` (the default)  | other choices                     |
|------------------------------|-----------------------------------|-----------------------------------|
| ``.mlpackage`` (ML Program)  | ``"mil"``: anefx's interpreter    | ``"coreml"``: Core ML, macOS only |
| ``.aimodel``                 | ``"coreai"``: coreai-core runtime |                                   |

The interpreter is the default everywhere, macOS included, so that results do not depend on the
machine; ``runtime="coreml"`` runs the same package with Apple's Core ML to compare the two.
Every executor gives the interface of :class:`anefx.targets.executor.LoadedProgram`.

A chunk folder (``manifest.json`` and one package per chunk) will load as a program whose call runs
the chunks in order, threading each chunk's outputs into the next one's inputs and giving each chunk
its own states: one more ``LoadedProgram`` over the per-chunk programs this module already loads.
It is wired when chunked artifacts share one manifest format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anefx.ir.errors import AnefxError, TargetUnavailableError
from anefx.targets.executor import LoadedProgram, State, TensorSpec

RUNTIMES = ("auto", "mil", "coreml", "coreai")


def load(path, runtime: str = "auto") -> LoadedProgram:
    """The program saved at ``path`` (an ``.mlpackage`` or an ``.aimodel``), ready to run.

    ``path`` may also be a coremltools ``MLModel`` (an ML Program, e.g. what ``ct.convert``
    returned): the interpreter runs the package behind it, the bytes its ``save`` writes."""
    if runtime not in RUNTIMES:
        raise AnefxError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if hasattr(path, "get_spec") and runtime in ("auto", "mil"):
        from anefx.targets.mil import MILProgram

        return MILProgram.from_mlmodel(path)
    path = Path(path)
    if not path.exists():
        raise AnefxError(f"cannot load {path}: no such file or folder")
    if (path / "manifest.json").is_file():
        raise AnefxError(
            f"{path} is a chunk folder (manifest.json): load its packages one by one "
            f"({', '.join(sorted(p.name for p in path.glob('*.mlpackage')))}); running the chain as one "
            "program is not wired yet"
        )
    if path.suffix == ".aimodel" or ((path / "metadata.json").is_file() and not (path / "Manifest.json").exists()):
        if runtime not in ("auto", "coreai"):
            raise AnefxError(f"{path} is a Core AI model: it runs with runtime='coreai', not {runtime!r}")
        from anefx.targets.coreai import CoreAIProgram

        return CoreAIProgram(path)
    if runtime == "coreai":
        raise AnefxError(f"{path} is not an .aimodel: runtime='coreai' runs Core AI models")
    if runtime == "coreml":
        return CoreMLProgram(path)
    from anefx.targets.mil import MILProgram

    return MILProgram.open(path)


class CoreMLState(State):
    """Core ML's own ``MLState`` (macOS), read and written through coremltools."""

    def __init__(self, specs: dict[str, TensorSpec], mlstate):
        self.specs = dict(specs)
        self.mlstate = mlstate

    def _read(self, name: str) -> np.ndarray:  # pragma: no cover - macOS only
        return np.array(self.mlstate.read_state(name), copy=True)

    def _write(self, name: str, value: np.ndarray) -> None:  # pragma: no cover - macOS only
        self.mlstate.write_state(name, value)


class CoreMLProgram(LoadedProgram):
    """A saved ``.mlpackage`` run by Apple's Core ML (macOS; ``coremltools``' ``MLModel.predict``),
    one ``MLModel`` per function; the interface comes from the program itself, as the interpreter
    reads it, so that both executors describe a package the same way."""

    runtime = "coreml"

    def __init__(self, path, compute_units: str = "CPU_AND_NE"):
        from anefx.targets.coreml import coremltools_module, runtime_available
        from anefx.targets.mil.reader import read_package

        ok, why = runtime_available()
        if not ok:
            raise TargetUnavailableError(f"runtime='coreml' cannot run here: {why}; the default runtime runs it")
        self.source = str(path)
        read = read_package(path)  # pragma: no cover - macOS only from here on
        self._info, self._default = read.functions, read.default_function
        ct = coremltools_module()
        units = ct.ComputeUnit[compute_units]
        self._models = {
            name: ct.models.MLModel(
                str(path), compute_units=units, function_name=name if len(read.functions) > 1 else None
            )
            for name in read.functions
        }

    @property
    def functions(self) -> list[str]:  # pragma: no cover - macOS only
        return list(self._info)

    @property
    def default_function(self) -> str:  # pragma: no cover - macOS only
        return self._default

    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:  # pragma: no cover - macOS only
        return dict(self._info[self.function_name(function)].inputs)

    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:  # pragma: no cover - macOS only
        return dict(self._info[self.function_name(function)].outputs)

    def states(self, function: str | None = None) -> dict[str, TensorSpec]:  # pragma: no cover - macOS only
        return dict(self._info[self.function_name(function)].states)

    def make_state(self, function: str | None = None) -> CoreMLState:  # pragma: no cover - macOS only
        name = self.function_name(function)
        return CoreMLState(self.states(name), self._models[name].make_state())

    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:  # pragma: no cover - macOS only
        name = self.function_name(function)
        arrays = self.checked_inputs(name, inputs)
        state = self.checked_state(name, state)
        kwargs = {"state": state.mlstate} if isinstance(state, CoreMLState) else {}
        out = self._models[name].predict(arrays, **kwargs)
        return {k: np.asarray(out[k]).astype(spec.dtype) for k, spec in self.outputs(name).items()}
