"""The interface of a runnable program: what ``anefx.load(path)`` returns, whatever runs it.

Three executors implement it: anefx's MIL interpreter (:class:`anefx.targets.mil.MILProgram`, any
ML Program on any OS), Core ML itself on macOS (:class:`anefx.targets.runtime.CoreMLProgram`) and
Core AI's runtime (:class:`anefx.targets.coreai.CoreAIProgram`, ``.aimodel`` on Linux and Apple's OS).
A program has one or more functions (``main``; or ``prefill`` and ``decode`` of a compiled LM), each
with named inputs and outputs and, for stateful programs, named states (the KV cache) that a
:class:`State` carries from one call to the next::

    program = anefx.load("smollm2.mlpackage")
    state = program.make_state("decode")          # zeros; prefill and decode share it
    out = program({"input_ids": ids, "position_ids": pos}, function="prefill", state=state)
    out["logits"]                                 # numpy, in the program's dtype (fp16 here)

A program made of several packages run one after another (a chunk folder) is a program of the same
interface (:class:`ChainProgram`) whose call runs its parts in order (:func:`run_chain`: the one chain
runner, which the artifact's own PyTorch runs use too).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from anefx.ir.errors import AnefxError


class TensorSpec(NamedTuple):
    """Shape (``None`` for a flexible dimension) and numpy dtype of an input, output or state."""

    shape: tuple[int | None, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        return f"{'x'.join('?' if d is None else str(d) for d in self.shape) or 'scalar'} {self.dtype.name}"


class State(Mapping):
    """The values of a program's states, carried across calls: each call reads them and stores the
    new values back into this object. ``state[name]`` is a numpy copy in the state's dtype;
    ``state[name] = array`` replaces a value (same shape). One state object serves every function
    that declares the same states (``prefill`` and ``decode`` of a compiled LM)."""

    specs: dict[str, TensorSpec]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, name: str) -> np.ndarray:
        self._known(name)
        return self._read(name)

    def __setitem__(self, name: str, value) -> None:
        spec = self._known(name)
        array = np.asarray(value)
        if tuple(array.shape) != tuple(spec.shape):
            raise AnefxError(f"state {name!r} has shape {spec.shape}, got an array of shape {array.shape}")
        self._write(name, array.astype(spec.dtype))

    def _known(self, name: str) -> TensorSpec:
        if name not in self.specs:
            raise KeyError(f"no state named {name!r}; this state holds {list(self.specs)}")
        return self.specs[name]

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray: ...

    @abc.abstractmethod
    def _write(self, name: str, value: np.ndarray) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}: {v}' for k, v in self.specs.items())})"


class LoadedProgram(abc.ABC):
    """A saved program that can run: its functions, their inputs, outputs and states, and a call."""

    #: which executor runs it: ``"mil"`` (anefx's interpreter), ``"coreml"``, ``"coreai"``
    runtime: ClassVar[str]
    source: str = ""

    @property
    @abc.abstractmethod
    def functions(self) -> list[str]:
        """The function names, in the program's order."""

    @property
    @abc.abstractmethod
    def default_function(self) -> str:
        """The function a call runs when none is named (``main``; ``decode`` in anefx's LM packages)."""

    @abc.abstractmethod
    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        """Name → (shape, dtype) of the function's inputs (states excluded), in the program's order."""

    @abc.abstractmethod
    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        """Name → (shape, dtype) of the function's outputs, in the program's order."""

    @abc.abstractmethod
    def states(self, function: str | None = None) -> dict[str, TensorSpec]:
        """Name → (shape, dtype) of the states the function reads and writes (empty if none)."""

    @abc.abstractmethod
    def make_state(self, function: str | None = None) -> State:
        """A fresh state (zeros) for ``function``'s states."""

    @abc.abstractmethod
    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``function`` (the default one if None) on ``inputs`` (numpy arrays, torch tensors or
        nested lists; converted to each input's dtype), reading and updating ``state``. Returns the
        outputs in the program's order and dtypes."""

    # -- helpers shared by the executors -------------------------------------------------------

    def function_name(self, function: str | None) -> str:
        name = self.default_function if function is None else function
        if name not in self.functions:
            raise AnefxError(
                f"{self.source or 'this program'} has no function {name!r}; its functions: {self.functions}"
            )
        return name

    def checked_inputs(self, function: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` as numpy arrays of the declared dtypes, in the declared order; an error naming
        the input for a missing or unexpected name, a wrong shape or a lossy dtype conversion."""
        specs = self.inputs(function)
        missing = [n for n in specs if n not in inputs]
        extra = [n for n in inputs if n not in specs]
        if missing or extra:
            wanted = ", ".join(f"{n} ({s})" for n, s in specs.items())
            raise AnefxError(
                f"function {function!r} takes inputs {wanted}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra}" if extra else "")
            )
        return {name: _as_input(name, inputs[name], spec) for name, spec in specs.items()}

    def checked_state(self, function: str, state: State | None) -> State | None:
        specs = self.states(function)
        if not specs:
            return state
        if state is None:
            raise AnefxError(
                f"function {function!r} reads and writes states {list(specs)}: pass "
                f"state=program.make_state({function!r}) (and the same object to the following calls)"
            )
        missing = [n for n in specs if n not in state.specs]
        if missing:
            raise AnefxError(f"the state passed to {function!r} lacks {missing}; it holds {list(state.specs)}")
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, functions={self.functions})"


def _as_input(name: str, value, spec: TensorSpec) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    shape = tuple(array.shape)
    if len(shape) != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, shape)):
        raise AnefxError(f"input {name!r} has shape {shape}; the program wants {spec}")
    if array.dtype == spec.dtype:
        return array
    want_int = np.issubdtype(spec.dtype, np.integer)
    if want_int and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise AnefxError(f"input {name!r} is {array.dtype}; the program wants integers ({spec.dtype})")
    if want_int and array.size:
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise AnefxError(f"input {name!r} has values outside {spec.dtype}'s range [{info.min}, {info.max}]")
    return array.astype(spec.dtype)


# ---------------------------------------------------------------------------------------------
# a chain of programs run as one
# ---------------------------------------------------------------------------------------------

Part = TypeVar("Part")


def run_chain(
    parts: Sequence[Part],
    values: Mapping[str, Any],
    inputs_of: Callable[[Part], list[str]],
    call: Callable[[int, Part, dict[str, Any]], Mapping[str, Any]],
) -> dict[str, Any]:
    """Run a chain of parts in order: the one way anefx runs a chain, whatever its parts are (the
    artifact's PyTorch graphs, or loaded programs). ``values`` are the caller's inputs; part ``i``
    gets the names ``inputs_of(part)`` (each the caller's input of that name, or the output of that
    name of the latest earlier part) and ``call(i, part, inputs)`` returns its outputs by name.
    Returns every value: the caller's inputs and all outputs, a later one replacing an earlier one."""
    env = dict(values)
    for i, part in enumerate(parts):
        wanted = inputs_of(part)
        missing = [n for n in wanted if n not in env]
        if missing:
            raise AnefxError(f"part {i} of the chain needs {missing}: neither given nor made by an earlier part")
        env.update(call(i, part, {n: env[n] for n in wanted}))
    return env


class ChainState(State):
    """The states of a chain: each name lives in the state of the part that holds it."""

    def __init__(self, parts: list[State | None]):
        self.parts = parts
        self.specs = {n: s for part in parts if part is not None for n, s in part.specs.items()}

    def _part(self, name: str) -> State:
        return next(p for p in self.parts if p is not None and name in p.specs)

    def _read(self, name: str) -> np.ndarray:
        return self._part(name)[name]

    def _write(self, name: str, value: np.ndarray) -> None:
        self._part(name)[name] = value


class ChainProgram(LoadedProgram):
    """Programs run one after another as one program (a chunked artifact): every function runs
    through every part in order; an input the caller does not give is the output of the same name of
    an earlier part; each part keeps its own states (:class:`ChainState`). ``inputs`` / ``outputs``:
    per function, the names the caller gives and gets (the manifest's)."""

    def __init__(
        self,
        parts: list[LoadedProgram],
        inputs: dict[str, list[str]],
        outputs: dict[str, list[str]],
        default: str,
        source: str = "",
    ):
        self.parts = parts
        self._inputs, self._outputs, self._default = inputs, outputs, default
        self.source = source or f"a chain of {len(parts)} programs"

    @property
    def runtime(self) -> str:  # type: ignore[override]
        return self.parts[0].runtime

    @property
    def functions(self) -> list[str]:
        return list(self._inputs)

    @property
    def default_function(self) -> str:
        return self._default

    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        name = self.function_name(function)
        specs = {}
        for part in self.parts:
            if name not in part.functions:
                continue
            specs |= {n: s for n, s in part.inputs(name).items() if n in self._inputs[name] and n not in specs}
        return {n: specs[n] for n in self._inputs[name]}

    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        name = self.function_name(function)
        specs = {}
        for part in self.parts:
            if name not in part.functions:
                continue
            specs |= {n: s for n, s in part.outputs(name).items() if n in self._outputs[name]}
        return {n: specs[n] for n in self._outputs[name]}

    def states(self, function: str | None = None) -> dict[str, TensorSpec]:
        name = self.function_name(function)
        return {n: s for part in self.parts if name in part.functions for n, s in part.states(name).items()}

    def make_state(self, function: str | None = None) -> ChainState:
        name = self.function_name(function)
        return ChainState(
            [part.make_state(name) if name in part.functions and part.states(name) else None for part in self.parts]
        )

    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:
        name = self.function_name(function)
        values = self.checked_inputs(name, inputs)
        state = self.checked_state(name, state)
        if state is not None and not isinstance(state, ChainState):
            raise TypeError(f"a chain runs with the state of its make_state(), got a {type(state).__name__}")

        def call(i: int, part: LoadedProgram, given: dict[str, Any]) -> Mapping[str, Any]:
            return part(given, function=name, state=state.parts[i] if state is not None else None)

        holding = [(i, part) for i, part in enumerate(self.parts) if name in part.functions]

        def call_held(j: int, part: LoadedProgram, given: dict[str, Any]) -> Mapping[str, Any]:
            return call(holding[j][0], part, given)

        env = run_chain([part for _, part in holding], values, lambda part: list(part.inputs(name)), call_held)
        return {n: env[n] for n in self._outputs[name]}


class OnDemand(LoadedProgram):
    """A program loaded for each call and released after it (``load()`` gives it): a part of a chain
    whose parts would not all fit in memory at once (Whisper-large-v3's four chunks hold 3.1 GB of
    fp16 weights, on top of everything the compile holds when its end-to-end check runs them). Its
    interface (functions, inputs, outputs, states) is read at the first load; each call and each
    :meth:`make_state` loads it again (a state outlives the program that made it)."""

    def __init__(self, load: Callable[[], LoadedProgram]):
        self._load = load
        program = load()
        self.runtime = program.runtime  # type: ignore[misc]
        self.source = program.source
        self._functions = list(program.functions)
        self._default = program.default_function
        self._io = {fn: (program.inputs(fn), program.outputs(fn), program.states(fn)) for fn in self._functions}
        #: loads so far (the first one included)
        self.loads = 1

    def program(self) -> LoadedProgram:
        """The program, loaded now (not kept)."""
        self.loads += 1
        return self._load()

    @property
    def functions(self) -> list[str]:
        return list(self._functions)

    @property
    def default_function(self) -> str:
        return self._default

    def inputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._io[self.function_name(function)][0])

    def outputs(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._io[self.function_name(function)][1])

    def states(self, function: str | None = None) -> dict[str, TensorSpec]:
        return dict(self._io[self.function_name(function)][2])

    def make_state(self, function: str | None = None) -> State:
        return self.program().make_state(self.function_name(function))

    def __call__(
        self, inputs: Mapping[str, Any], *, function: str | None = None, state: State | None = None
    ) -> dict[str, np.ndarray]:
        return self.program()(inputs, function=self.function_name(function), state=state)
