"""A saved ML Program run by anefx's MIL interpreter: :class:`MILProgram` and its :class:`MILState`."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from anefx.targets.executor import LoadedProgram, State, TensorSpec
from anefx.targets.mil.interpreter import (
    Constants,
    FunctionPlan,
    check_supported,
    coerce,
    declared,
    plan_function,
    run_function,
    run_steps,
)
from anefx.targets.mil.reader import ReadProgram, read_mlmodel, read_package, read_spec

#: a program read with at least these weight bytes is collected right after its load (see
#: :meth:`MILProgram._prepared`); below, Python's own collections free it in time
COLLECT_ABOVE_BYTES = 64 * 2**20


class MILOp(NamedTuple):
    """One op a function runs, as :meth:`MILProgram.operations` lists it."""

    position: int  #: index in the function's block (``const`` ops count)
    op_type: str
    name: str
    inputs: tuple[str, ...]  #: the names of the values it reads
    outputs: tuple[str, ...]  #: the names of the values it writes
    dtypes: tuple[str, ...]  #: their MIL dtypes


class MILState(State):
    """States of a program run by the interpreter: name → value, held as the interpreter holds values
    (fp16 states as float32 tensors of fp16 values); a call replaces them with the new values."""

    def __init__(self, specs: dict[str, TensorSpec], dtypes: dict[str, str]):
        self.specs = dict(specs)
        self.dtypes = dict(dtypes)  #: state name → MIL dtype
        self.values = {n: coerce(torch.zeros(s.shape), dtypes[n]) for n, s in specs.items()}

    def _read(self, name: str) -> np.ndarray:
        return declared(self.values[name], self.dtypes[name]).numpy().copy()

    def _write(self, name: str, value: np.ndarray) -> None:
        self.values[name] = coerce(torch.from_numpy(np.ascontiguousarray(value)), self.dtypes[name])


class MILProgram(LoadedProgram):
    """An ML Program executed by anefx's MIL interpreter (:mod:`anefx.targets.mil.interpreter`).

    ``MILProgram.open(path)`` reads a saved or staged ``.mlpackage``; ``MILProgram.from_mlmodel(m)``
    the package behind a ``coremltools`` ``MLModel`` (what ``ct.convert`` staged: the bytes ``save``
    writes); ``MILProgram.from_spec(spec, weights_dir)`` a protobuf and its weight folder. Every
    function is prepared on loading (compressed weights decompressed once, weights shared between
    functions); an op without a kernel fails the load with :class:`UnsupportedOpError`.
    """

    runtime = "mil"

    def __init__(self, read: ReadProgram):
        check_supported(read.program)
        self.source = read.source
        self._info = read.functions
        self._default = read.default_function
        constants = Constants()
        functions = read.program.functions
        self._plans: dict[str, FunctionPlan] = {
            name: plan_function(name, functions[name], constants) for name in self._info
        }
        #: MIL op type → count, per function (nested blocks included); ``const`` excluded
        self.op_counts: dict[str, dict[str, int]] = {name: _op_counts(functions[name]) for name in self._info}
        #: bytes of the weights the program holds (each distinct tensor once)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in constants.by_content.values())

    @classmethod
    def open(cls, path) -> MILProgram:
        return cls._prepared(lambda: read_package(Path(path)))

    @classmethod
    def from_mlmodel(cls, mlmodel) -> MILProgram:
        return cls._prepared(lambda: read_mlmodel(mlmodel))

    @classmethod
    def from_spec(cls, spec, weights_dir=None, source: str = "a Model protobuf") -> MILProgram:
        return cls._prepared(lambda: read_spec(spec, Path(weights_dir) if weights_dir else None, source))

    @classmethod
    def _prepared(cls, read) -> MILProgram:
        """The program prepared from what ``read()`` reads, which is then collected: coremltools'
        ``Program`` is a web of cycles (each ``Var`` and the ``Operation`` making it point at each
        other) holding the package's weights as numpy arrays, freed only by a collection of the
        oldest generation (Python runs one rarely in a process holding millions of objects, as a
        compile does): a chunk's weights a second time per load until then. Only for programs whose
        weights are worth a collection (:data:`COLLECT_ABOVE_BYTES`): a full collection costs about a
        quarter of a second in a process holding many objects, more than loading a small program."""
        program = cls(read())
        if program.weight_bytes >= COLLECT_ABOVE_BYTES:
            gc.collect()
        return program

    # -- the interface ---------------------------------------------------------------------------

    @property
    def functions(self) -> list[str]:
        return list(self._info)

    @property
    def default_function(self) -> str:
        return self._default

    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._info[self.function_name(function)].inputs)

    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._info[self.function_name(function)].outputs)

    def states(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._info[self.function_name(function)].states)

    def make_state(self, function: str | None = None) -> MILState:
        name = self.function_name(function)
        return MILState(self._info[name].states, self._plans[name].states)

    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:
        out = self.run_torch(inputs, function, state)
        return {k: v.numpy() for k, v in out.items()}

    # -- torch in, torch out (what anefx's own checks use) ---------------------------------------

    def run_torch(
        self, inputs: Mapping[str, torch.Tensor], function: str | None = None, state: State | None = None
    ) -> dict[str, torch.Tensor]:
        """Like a call, with torch tensors out (in their declared dtypes: fp16 as ``torch.float16``)."""
        name = self.function_name(function)
        plan = self._plans[name]
        out = run_function(plan, self._held_inputs(name, inputs), self._states_of(name, state))
        return {k: _fresh(declared(v, plan.outputs[k]), v) for k, v in out.items()}

    def run_steps(
        self, inputs: Mapping[str, Any], function: str | None = None, state: State | None = None
    ) -> Iterator[tuple[MILOp, Mapping[str, Any]]]:
        """Run the function one op at a time: after each op of :meth:`operations`, yields it and the
        values the run holds by MIL name (its outputs, and its inputs, still live), as the
        interpreter holds them: fp16 values as float32 tensors of fp16 values, other types in
        their held dtypes (:data:`~anefx.targets.mil.interpreter.HELD`). A value nothing reads any
        more is freed when the run resumes: a caller keeps what it needs beyond the op (to compare
        each op with a reference while holding only the live values). Stopping the iteration stops
        the run (a ``state`` is then left as far as the run went)."""
        name = self.function_name(function)
        plan = self._plans[name]
        ops = self.operations(name)
        for i, live in run_steps(plan, self._held_inputs(name, inputs), self._states_of(name, state)):
            yield ops[i], live

    def operations(self, function: str | None = None) -> list[MILOp]:
        """The ops ``function`` runs at call time, in order (top-level block; ops whose inputs are
        all constants were evaluated on loading and are not listed): what :meth:`run_steps` runs."""
        plan = self._plans[self.function_name(function)]
        ops = []
        for step in plan.block.steps:
            reads = []
            for _, ref in step.params:
                reads.extend((ref,) if isinstance(ref, str) else ref)
            ops.append(MILOp(step.position, step.op_type, step.name, tuple(reads), step.outputs, step.dtypes))
        return ops

    @property
    def precision(self) -> str:
        """``"fp16"`` when some op of the program computes an fp16 value, else ``"fp32"``."""
        for plan in self._plans.values():
            if "fp16" in _value_dtypes(plan).values():
                return "fp16"
        return "fp32"

    def _held_inputs(self, function: str, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        arrays = self.checked_inputs(function, inputs)
        dtypes = self._plans[function].inputs
        return {k: coerce(torch.from_numpy(np.ascontiguousarray(v)), dtypes[k]) for k, v in arrays.items()}

    def _states_of(self, function: str, state: State | None) -> dict[str, torch.Tensor]:
        state = self.checked_state(function, state)
        if state is None:
            return {}
        if not isinstance(state, MILState):
            raise TypeError(f"the interpreter runs with the state of make_state(), got a {type(state).__name__}")
        return state.values


def _fresh(value: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """An output the caller may modify: a copy when it is the interpreter's own tensor (a constant,
    a state, an input passed through)."""
    return value.clone() if value is held else value


def _value_dtypes(plan: FunctionPlan) -> dict[str, str]:
    dtypes = dict(plan.inputs)

    def visit(block):
        for step in block.steps:
            dtypes.update(zip(step.outputs, step.dtypes))
            for inner in step.blocks:
                visit(inner)

    visit(plan.block)
    return dtypes


def _op_counts(block) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(b):
        for op in b.operations:
            if op.op_type != "const":
                counts[op.op_type] = counts.get(op.op_type, 0) + 1
            for inner in op.blocks:
                visit(inner)

    visit(block)
    return counts
