"""Read a saved ML Program back into coremltools' MIL ``Program``: every function, its weights.

Where anefx touches coremltools to read programs: ``ct.utils.load_spec`` (the package's protobuf),
coremltools' ``milproto`` loader (protobuf + weight blobs → MIL ``Program``, the inverse of what
``ct.convert`` writes; it fills each op's optional inputs with the defaults of coremltools' op
definitions), through :func:`anefx.compat.coremltools.program_from_spec`, and the MIL ``Program`` /
``Function`` / ``Operation`` / ``Var`` objects of coremltools' MIL builder API (``op.op_type``,
``op.inputs``, ``op.outputs``, ``op.blocks``, ``var.val``, ``var.dtype``, ``var.shape``).
``tests/test_compat.py`` and ``tests/test_mil_interpreter.py`` pin what is relied on.

A program can come from a saved or staged ``.mlpackage`` folder (:func:`read_package`), from an
``MLModel`` (:func:`read_mlmodel`: the package ``ct.convert`` staged, i.e. the bytes ``save`` will
write), or from a ``Model`` protobuf and its weights folder (:func:`read_spec`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anefx.compat.coremltools import coremltools_module, program_from_spec, quiet_coremltools
from anefx.ir.errors import AnefxError
from anefx.targets.executor import TensorSpec

WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights"


@dataclass
class FunctionInfo:
    """A function's interface, in the program's order (states are not among the inputs)."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    states: dict[str, TensorSpec]


@dataclass
class ReadProgram:
    """A MIL ``Program`` read back from its protobuf, with each function's interface."""

    program: object  #: coremltools' ``mil.Program``
    functions: dict[str, FunctionInfo]
    default_function: str
    source: str  #: where it came from (a path, or a description)


def read_package(path) -> ReadProgram:
    """A saved (or staged) ``.mlpackage`` folder."""
    path = Path(path)
    if not path.exists():
        raise AnefxError(f"cannot load {path}: no such file or folder")
    if not (path / "Manifest.json").is_file():
        raise AnefxError(f"cannot load {path}: not an .mlpackage (no Manifest.json inside)")
    ct = coremltools_module()
    with quiet_coremltools():
        spec = ct.utils.load_spec(str(path))
    return read_spec(spec, path / WEIGHTS, source=str(path))


def read_mlmodel(mlmodel) -> ReadProgram:
    """A ``coremltools.models.MLModel`` (an ML Program): its protobuf and the weights of its package."""
    weights = getattr(mlmodel, "weights_dir", None)
    return read_spec(mlmodel.get_spec(), Path(weights) if weights else None, source="an in-memory MLModel")


def read_spec(spec, weights_dir: Path | None, source: str = "a Model protobuf") -> ReadProgram:
    """A ``Model`` protobuf of an ML Program and the folder of its weight blobs."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise AnefxError(
            f"cannot load {source}: it is a {spec.WhichOneof('Type')} model, not an ML Program; "
            "anefx runs ML Programs (convert_to='mlprogram', what anefx and ct.convert write by default)"
        )
    coremltools_module()
    with warnings.catch_warnings(), quiet_coremltools():
        warnings.simplefilter("ignore")
        program = program_from_spec(spec, str(weights_dir or ""))
    described = [f.name for f in spec.description.functions]  # the package's order (the proto map has none)
    order = [n for n in described if n in program.functions] + sorted(set(program.functions) - set(described))
    functions = {name: _describe(name, program.functions[name]) for name in order}
    default = spec.description.defaultFunctionName or ("main" if "main" in functions else order[0])
    return ReadProgram(program, functions, default, source)


def _describe(name: str, function) -> FunctionInfo:
    inputs, states = {}, {}
    for input_name, var in function.inputs.items():
        (states if is_state(var) else inputs)[input_name] = spec_of(var)
    outputs = {var.name: spec_of(var) for var in function.outputs}
    return FunctionInfo(name, inputs, outputs, states)


def is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def dtype_name(var) -> str:
    """The MIL dtype of a var (``"fp16"``, ``"int32"``, ``"uint4"``, ``"bool"``, ``"string"`` …)."""
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def spec_of(var) -> TensorSpec:
    """Shape (``None`` for a flexible dimension) and numpy dtype of a tensor (or state) var."""
    shape = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)
    return TensorSpec(shape, numpy_dtype(dtype_name(var)))


_NUMPY = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "bool": np.bool_,
}


def numpy_dtype(name: str) -> np.dtype:
    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    if name.startswith(("uint", "int")):  # sub-byte weights (uint1 … uint6, int4) are unpacked into bytes
        return np.dtype(np.int8 if name.startswith("int") else np.uint8)
    raise AnefxError(f"the MIL dtype {name!r} has no numpy equivalent")
