"""Execute a MIL program with torch (CPU), op by op, in the precision the program declares.

Preparing a function (:func:`plan_function`) walks its operations once: each op gets its kernel
from :data:`~anefx.targets.mil.kernels.KERNELS` (or is one the interpreter runs itself: ``const``,
``read_state``, ``coreml_update_state``, ``cond``, ``while_loop``). An op with no kernel raises
:class:`UnsupportedOpError` naming the op, the function and the op's position: nothing is skipped.
Ops whose inputs are all constants (the ``constexpr_*`` decompression of compressed weights, casts
of weights …) are evaluated then, once, by the same kernels; every other op becomes a step.

Precision (the device computes fp16 programs in fp16):

- every value is stored in the dtype its var declares: after each op, the result is cast to the
  declared dtype, so an fp16 value is rounded to fp16 (and overflows to ``inf`` beyond 65,504)
  exactly where the program stores an fp16 tensor. Floating values are held as float32 tensors whose
  values are those of the declared type (fp16 values are exact in float32);
- inside one op, the kernel computes in float32 (fp16 x fp16 products are exact in float32): for a
  single elementwise op (``add``, ``mul``, ``real_div``, ``sqrt`` …) this gives the correctly rounded
  fp16 result; for ops that accumulate (``conv``, ``matmul``, ``einsum``, reductions, ``softmax``,
  ``layer_norm``) the accumulation order and its precision differ from the device's, and
  transcendental functions (``exp``, ``tanh``, ``erf`` …) are float32's, within an fp16 unit in the
  last place of the device's. Intermediate overflow *inside* one fused op (the squares of a
  ``layer_norm``) is not modelled: only what the op stores.

Weights (constants, and values folded from constants only, of 1,024 elements or more declared
fp16) are stored as float16, their exact values, and read as float32 by each op that takes them
(:func:`_read`): a program's weights take their package's bytes, not twice them (Whisper-large-v3's
chunks, loaded together for the end-to-end check: 3.1 GB, not 6.2 GB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anefx.ir.errors import AnefxError
from anefx.targets.mil.kernels import KERNELS, Args
from anefx.targets.mil.reader import dtype_name, is_state

#: Ops the interpreter runs itself (they read or write its state, or hold nested blocks).
INTERPRETER_OPS = frozenset({"const", "read_state", "coreml_update_state", "cond", "while_loop"})
#: Every MIL op type this interpreter executes.
SUPPORTED_OPS = frozenset(KERNELS) | INTERPRETER_OPS
#: Ops never evaluated ahead of time even when their inputs are constants.
_NOT_FOLDED = frozenset({"random_bernoulli", "random_categorical", "random_normal", "random_uniform"})


class UnsupportedOpError(AnefxError):
    """The program holds an op the interpreter has no kernel for."""


class ExecutionError(AnefxError):
    """An op failed, or produced a value other than the one the program declares."""


# ---------------------------------------------------------------------------------------------
# dtypes: how each MIL dtype is held while running
# ---------------------------------------------------------------------------------------------

#: MIL dtype → the torch dtype values of that type are held in (fp16 values in float32).
HELD = {
    "fp16": torch.float32,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.int32,
    "int32": torch.int32,
    "uint32": torch.int64,
    "int64": torch.int64,
    "bool": torch.bool,
}
#: MIL dtype → the torch dtype a value is returned in.
DECLARED = {**HELD, "fp16": torch.float16, "uint16": torch.uint16, "uint32": torch.uint32}


def held_dtype(name: str) -> torch.dtype | None:
    """``None`` for strings; sub-byte weights (``uint4`` …) are held in bytes."""
    if name in HELD:
        return HELD[name]
    if name.startswith("uint"):
        return torch.uint8
    if name.startswith("int"):
        return torch.int8
    return None


def coerce(value, name: str) -> Any:
    """``value`` as held for MIL dtype ``name``: cast to it, fp16 rounded (``inf`` beyond 65,504)."""
    if isinstance(value, (str, list, tuple)) or value is None:
        return value
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if name == "fp16":
        return value.to(torch.float16).to(torch.float32)
    dtype = held_dtype(name)
    return value if dtype is None or value.dtype == dtype else value.to(dtype)


#: Constants of at least this many elements declared fp16 are stored as float16 (see the docstring).
STORED_FP16_MIN = 1024


def stored(value, name: str):
    """A held constant as the interpreter stores it: a large fp16 one as float16 (exact)."""
    if name == "fp16" and isinstance(value, torch.Tensor) and value.numel() >= STORED_FP16_MIN:
        return value.to(torch.float16)
    return value


def _read(value):
    """A stored value as held (float32 for an fp16 one stored as float16)."""
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value


def declared(value: torch.Tensor, name: str) -> torch.Tensor:
    """A held value in its declared dtype (fp16 as ``torch.float16``)."""
    dtype = DECLARED.get(name) or held_dtype(name)
    return value.to(dtype) if dtype is not None and value.dtype != dtype else value


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Step:
    kind: str  #: "kernel", "read_state", "update_state", "cond" or "while_loop"
    op_type: str
    where: str  #: "op #12 (conv 'x_3') of function 'main'", for errors
    kernel: Any
    params: tuple  #: (parameter, var name) or (parameter, tuple of var names)
    outputs: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple | None, ...]
    blocks: tuple = ()
    state: str = ""  #: the state a read_state / coreml_update_state touches
    state_dtype: str = ""  #: its MIL dtype
    free: tuple[str, ...] = ()  #: values not needed after this step
    name: str = ""  #: the op's name in the program
    position: int = -1  #: the op's index in its block


@dataclass
class BlockPlan:
    inputs: tuple[str, ...]
    steps: list[Step]
    outputs: tuple[str, ...]


@dataclass
class FunctionPlan:
    name: str
    inputs: dict[str, str]  #: input name → MIL dtype
    states: dict[str, str]  #: state name → MIL dtype
    outputs: dict[str, str]  #: output name → MIL dtype
    block: BlockPlan
    constants: dict[str, Any] = field(repr=False)  #: values of constants (and folded ops) steps read


class Constants:
    """Constant values while planning: one tensor per distinct weight, shared by every function
    of a multifunction program (``prefill`` and ``decode`` read the same weights), and each folded
    op evaluated once for identical inputs."""

    def __init__(self):
        self.by_content: dict[tuple, torch.Tensor] = {}
        self.folded: dict[tuple, tuple] = {}

    def value(self, var) -> Any:
        name = dtype_name(var)
        val = var.val
        if isinstance(val, str) or name == "string":
            return str(val)
        if isinstance(val, np.ndarray) and val.size >= 1024:
            array = np.ascontiguousarray(val)
            key = (name, array.shape, hashlib.blake2b(array.view(np.uint8).reshape(-1)).digest())
            if key not in self.by_content:
                self.by_content[key] = stored(coerce(torch.from_numpy(array.copy()), name), name)
            return self.by_content[key]
        return coerce(torch.as_tensor(np.asarray(val)), name)


def constant_value(var, constants: Constants | None = None) -> torch.Tensor:
    """The value of ``var`` computed from constants only (a ``const``, or a chain of ``constexpr_*``
    ops over them: a compressed weight), by the interpreter's kernels, in its declared dtype (fp16
    as ``torch.float16``). coremltools' own ``materialized_val_inference`` expands a per-tensor LUT
    through a table repeated to the weight's size: minutes for an LM's embedding table."""
    constants = constants if constants is not None else Constants()
    op = var.op
    if op is None or op.op_type == "const":
        return declared(constants.value(var), dtype_name(var))
    if op.op_type not in KERNELS:
        raise UnsupportedOpError(f"anefx's MIL interpreter has no kernel for '{op.op_type}' ('{op.name}')")
    step = Step(
        "kernel",
        op.op_type,
        f"{op.op_type} '{op.name}'",
        KERNELS[op.op_type],
        tuple(
            (p, v.name if not isinstance(v, (list, tuple)) else tuple(x.name for x in v))
            for p, v in op.inputs.items()
            if not p.startswith("_")
        ),
        tuple(v.name for v in op.outputs),
        tuple(dtype_name(v) for v in op.outputs),
        tuple(_shape(v) for v in op.outputs),
    )
    env = {}
    for v in op.inputs.values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            env[x.name] = coerce(constant_value(x, constants), dtype_name(x))
    _run_kernel(step, env)
    return declared(env[var.name], dtype_name(var))


def _shape(var) -> tuple | None:
    shape = var.shape
    if any(not isinstance(d, (int, np.integer)) for d in shape):
        return None  # a flexible dimension: checked at run time only through the kernels
    return tuple(int(d) for d in shape)


def _check_supported(block, function: str, prefix: str = "") -> list[tuple[str, str]]:
    missing = []
    for i, op in enumerate(block.operations):
        where = f"op #{i} ({op.op_type} '{op.name}'){prefix} of function '{function}'"
        if op.op_type not in SUPPORTED_OPS:
            missing.append((op.op_type, where))
        for b, inner in enumerate(op.blocks):
            missing += _check_supported(inner, function, f" in block {b} of op #{i} ('{op.name}'){prefix}")
    return missing


def check_supported(program) -> None:
    """Raise :class:`UnsupportedOpError` for the first op of ``program`` without a kernel."""
    missing = []
    for name, function in program.functions.items():
        missing += _check_supported(function, name)
    if missing:
        op_type, where = missing[0]
        others = sorted({t for t, _ in missing[1:]} - {op_type})
        more = f"; the program also holds {', '.join(others)}" if others else ""
        raise UnsupportedOpError(
            f"anefx's MIL interpreter has no kernel for '{op_type}': {where}{more}. "
            "Nothing ran: the interpreter never skips an op. Add the kernel to anefx/targets/mil/kernels/"
        )


def plan_function(name: str, function, constants: Constants) -> FunctionPlan:
    """The steps of one function of a MIL ``Program`` (constants evaluated, last uses marked)."""
    known: dict[str, Any] = {}
    inputs = {n: dtype_name(v) for n, v in function.inputs.items() if not is_state(v)}
    states = {n: dtype_name(v) for n, v in function.inputs.items() if is_state(v)}
    block = _plan_block(function, (), name, "", known, constants)
    outputs = {v.name: dtype_name(v) for v in function.outputs}
    _mark_last_uses(block, set(outputs) | set(known))
    used = _names_read(block) | set(outputs)
    return FunctionPlan(name, inputs, states, outputs, block, {k: v for k, v in known.items() if k in used})


def _plan_block(block, inputs, function, prefix, known, constants) -> BlockPlan:
    steps: list[Step] = []
    for i, op in enumerate(block.operations):
        where = f"op #{i} ({op.op_type} '{op.name}'){prefix} of function '{function}'"
        outs = tuple(v.name for v in op.outputs)
        dtypes = tuple(dtype_name(v) for v in op.outputs)
        if op.op_type == "const":
            known[outs[0]] = constants.value(op.outputs[0])
            continue
        params = tuple(
            (p, v.name if not isinstance(v, (list, tuple)) else tuple(x.name for x in v))
            for p, v in op.inputs.items()
            if not p.startswith("_")  # cond / while_loop's Python callables and block lists
        )
        shapes = tuple(_shape(v) for v in op.outputs)
        if op.op_type in ("read_state", "coreml_update_state"):
            state_var = op.inputs["input" if op.op_type == "read_state" else "state"]
            kind = "read_state" if op.op_type == "read_state" else "update_state"
            steps.append(
                Step(
                    kind,
                    op.op_type,
                    where,
                    None,
                    params,
                    outs,
                    dtypes,
                    shapes,
                    state=state_var.name,
                    state_dtype=dtype_name(state_var),
                    name=op.name,
                    position=i,
                )
            )
            continue
        if op.op_type in ("cond", "while_loop"):
            blocks = tuple(
                _plan_block(
                    inner,
                    tuple(v.name for v in inner.inputs),
                    function,
                    f" in block {b} of op #{i} ('{op.name}'){prefix}",
                    known,
                    constants,
                )
                for b, inner in enumerate(op.blocks)
            )
            steps.append(
                Step(
                    op.op_type, op.op_type, where, None, params, outs, dtypes, shapes, blocks, name=op.name, position=i
                )
            )
            continue
        kernel = KERNELS[op.op_type]
        step = Step("kernel", op.op_type, where, kernel, params, outs, dtypes, shapes, name=op.name, position=i)
        if op.op_type not in _NOT_FOLDED and all(_refs_known(ref, known) for _, ref in params):
            _fold(step, known, constants)
            continue
        steps.append(step)
    return BlockPlan(inputs, steps, tuple(v.name for v in block.outputs))


def _refs_known(ref, known) -> bool:
    return ref in known if isinstance(ref, str) else all(r in known for r in ref)


def _fold(step: Step, known: dict, constants: Constants) -> None:
    """Evaluate a step whose inputs are all constants, once (identical inputs: one evaluation)."""

    def ident(ref):
        value = known[ref]
        return id(value) if isinstance(value, torch.Tensor) and value.numel() >= 1024 else _small(value)

    key = (
        step.op_type,
        tuple((p, ident(r) if isinstance(r, str) else tuple(ident(x) for x in r)) for p, r in step.params),
    )
    if key not in constants.folded:
        env = dict(known)
        _run_kernel(step, env)
        constants.folded[key] = tuple(stored(env[o], d) for o, d in zip(step.outputs, step.dtypes))
    for name, value in zip(step.outputs, constants.folded[key]):
        known[name] = value


def _small(value):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), tuple(value.reshape(-1).tolist()))
    return value


def _names_read(block: BlockPlan) -> set[str]:
    names: set[str] = set(block.outputs)
    for step in block.steps:
        for _, ref in step.params:
            names.update((ref,) if isinstance(ref, str) else ref)
        for inner in step.blocks:
            names |= _names_read(inner)
    return names


def _mark_last_uses(block: BlockPlan, keep: set[str]) -> None:
    """Give each top-level step the run-time values read for the last time there (freed after it)."""
    last: dict[str, int] = {}
    for i, step in enumerate(block.steps):
        reads = set()
        for _, ref in step.params:
            reads.update((ref,) if isinstance(ref, str) else ref)
        for inner in step.blocks:
            reads |= _names_read(inner)
        for name in reads:
            last[name] = i
    frees: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep:
            frees.setdefault(i, []).append(name)
    for i, step in enumerate(block.steps):
        step.free = tuple(frees.get(i, ()))


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def run_function(
    plan: FunctionPlan, inputs: dict[str, torch.Tensor], states: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Run ``plan`` on held ``inputs`` (see :func:`coerce`), updating ``states`` (name → held value)
    in place. Returns the outputs, held."""
    env = _environment(plan, inputs)
    for _ in _run_steps(plan, env, states):
        pass
    return {name: _read(env[name]) for name in plan.outputs}


def run_steps(
    plan: FunctionPlan, inputs: dict[str, torch.Tensor], states: dict[str, torch.Tensor]
) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Run ``plan`` like :func:`run_function`, one top-level step at a time: after each, yields its
    index in ``plan.block.steps`` and the values the run holds, by MIL name (:class:`LiveValues`):
    its outputs, and every value it read, still live. Values nothing reads after a step are freed
    when the run resumes, so a caller that keeps none holds no more than the run itself; a caller
    that stops iterating stops the run."""
    env = _environment(plan, inputs)
    live = LiveValues(env)
    for i in _run_steps(plan, env, states):
        yield i, live


class LiveValues(Mapping[str, Any]):
    """A read-only view of a running function's values by MIL name, as held (fp16 values as float32
    tensors holding fp16 values; see :func:`coerce`); a freed value is no longer listed."""

    def __init__(self, env: dict[str, Any]):
        self._env = env

    def __getitem__(self, name: str) -> Any:
        return _read(self._env[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def _environment(plan: FunctionPlan, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    env = dict(plan.constants)
    env.update(inputs)
    return env


def _run_steps(plan: FunctionPlan, env: dict, states: dict) -> Iterator[int]:
    """Run the top-level steps, yielding each one's index after it ran and freeing the values read
    for the last time there when resumed."""
    for i, step in enumerate(plan.block.steps):
        with torch.inference_mode():
            _run_step(step, env, states)
        yield i
        for name in step.free:
            env.pop(name, None)


def _run_block(block: BlockPlan, env: dict, states: dict) -> None:
    """Run a nested block (of ``cond`` / ``while_loop``): its values are freed with the op's."""
    for step in block.steps:
        _run_step(step, env, states)


def _run_step(step: Step, env: dict, states: dict) -> None:
    kind = step.kind
    if kind == "kernel":
        _run_kernel(step, env)
    elif kind == "read_state":
        env[step.outputs[0]] = states[step.state]
    elif kind == "update_state":
        value = coerce(_read(env[dict(step.params)["value"]]), step.state_dtype)
        states[step.state] = value
        if step.outputs:
            env[step.outputs[0]] = value
    elif kind == "cond":
        pred = bool(env[dict(step.params)["pred"]])
        chosen = step.blocks[0 if pred else 1]
        _run_block(chosen, env, states)
        for name, out in zip(step.outputs, chosen.outputs):
            env[name] = env[out]
    else:  # while_loop: blocks (cond, body) take the loop variables as inputs
        cond_block, body = step.blocks
        values = [env[n] for n in dict(step.params)["loop_vars"]]
        while True:
            env.update(zip(cond_block.inputs, values))
            _run_block(cond_block, env, states)
            if not bool(env[cond_block.outputs[0]]):
                break
            env.update(zip(body.inputs, values))
            _run_block(body, env, states)
            values = [env[n] for n in body.outputs]
        env.update(zip(step.outputs, values))


def _run_kernel(step: Step, env: dict) -> None:
    args = {}
    for p, ref in step.params:
        args[p] = _read(env[ref]) if isinstance(ref, str) else [_read(env[r]) for r in ref]
    try:
        result = step.kernel(Args(args))
    except Exception as exc:
        raise ExecutionError(f"{step.where} failed: {type(exc).__name__}: {exc}") from exc
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(step.outputs):
        raise ExecutionError(f"{step.where}: the kernel gave {len(results)} values for {len(step.outputs)} outputs")
    for name, value, dtype, shape in zip(step.outputs, results, step.dtypes, step.shapes):
        value = coerce(value, dtype)
        if shape is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            raise ExecutionError(
                f"{step.where}: the kernel computed shape {tuple(value.shape)}, the program declares {shape}"
            )
        env[name] = value
