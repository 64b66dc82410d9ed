"""Core ML hand-off: the validated graph → coremltools → ML Program (``.mlpackage``).

Route: legalize a clone of the graph (respell ops coremltools 9 rejects, fold input-independent
subgraphs) → an ``ExportedProgram`` lifted from it directly (:mod:`anefx.targets.lift`; a fresh
``torch.export`` + ``run_decompositions({})`` when that is not possible, or with
``fast_conversion=False``) → ``ct.convert`` (mlprogram, fp16, ``CPU_AND_NE``) with coremltools'
default MIL pipeline and equivalent faster passes (:mod:`anefx.targets.mil_pipeline`). Inputs keep
the model's argument names, outputs the model's output names.

A function with states (``compile_lm``'s KV cache) is converted with its states as buffers written
in place (:mod:`anefx.targets.stateful`): ``torch.export`` records the writes, coremltools makes
them Core ML states (iOS18 / macOS15), and the exported program, made pure again, is what
``check_converter_input`` validates. Several functions are merged into one package
(``save_multifunction``: the weights they share are stored once) with the program's metadata.

What runs a package (:meth:`CoreMLTarget.executor`): anefx's MIL interpreter
(:class:`~anefx.targets.mil.MILProgram`, any OS: the default) or Core ML itself
(:class:`CoreMLProgram`, ``runtime="coreml"``). Core ML and ``MLComputePlan`` need macOS;
:func:`runtime_available` says whether this machine has them, and callers skip with its reason
elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

import anefx.ir.ops  # noqa: F401 - defines the anefx:: torch ops this target converts
from anefx.compat.coremltools import (
    coremltools_module,
    drop_in_memory_program,
    mil_program,
    names_apart,
    quiet_coremltools,
    released,
    torch_node_inputs,
)
from anefx.driver.events import Events, events_of
from anefx.ir.errors import ConversionError, TargetUnavailableError
from anefx.ir.graph import describe
from anefx.targets.base import Capabilities, ConvertedFunction, Package, Target
from anefx.targets.compression import SCHEMES, check_deployment_target, needs_ios18
from anefx.targets.executor import LoadedProgram, State, TensorSpec
from anefx.targets.handoff import HandOff, ProgramSpec, StateSpec, check_converter_input, legalized_clone
from anefx.targets.lift import keep_input_names, lifted_program
from anefx.targets.localize import fp32_selector
from anefx.targets.mil import MILProgram
from anefx.targets.mil.reader import read_package
from anefx.targets.mil_pipeline import pass_pipeline
from anefx.targets.stateful import functional_view, stateful_module


def runtime_available() -> tuple[bool, str]:
    """Whether Core ML models can be *run* here (``predict``, ``MLComputePlan``), and why not."""
    if platform.system() != "Darwin":
        return False, f"running Core ML models needs macOS (this is {platform.system()})"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False, "coremltools was installed without its native Core ML bindings"
    return True, "macOS with Core ML"


@dataclass(frozen=True)
class CoreMLOptions:
    """How the ML Program is built. Each field takes coremltools' own value or its name:
    ``ct.target.iOS18`` or ``"iOS18"``, ``ct.precision.FLOAT32`` or ``"float32"``,
    ``ct.ComputeUnit.ALL`` or ``"ALL"``."""

    minimum_deployment_target: Any = "iOS16"
    compute_precision: Any = "float16"  # or "float32"
    compute_units: Any = "CPU_AND_NE"  # ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE
    #: Hand the graph to coremltools as an ``ExportedProgram`` built directly (no second
    #: ``torch.export``) and run coremltools' default MIL pipeline with its faster equivalent passes
    #: (:mod:`anefx.targets.mil_pipeline`). The program is the same either way; False takes
    #: coremltools' own route (slower), e.g. to compare.
    fast_conversion: bool = True
    #: Extra keyword arguments for ``ct.convert`` (advanced).
    convert_kwargs: tuple[tuple[str, object], ...] = ()
    #: Torch nodes (names in the graph handed to the converter) whose MIL ops compute in fp32 in an
    #: fp16 program: the artifact check's fp16 fallback sets it for the region it located.
    fp32_nodes: frozenset[str] = frozenset()

    def resolved(self) -> tuple[Any, Any, Any]:
        """``(ct.target member, ct.precision member, ct.ComputeUnit member)``; a ``ConversionError``
        that lists the valid choices for anything else."""
        ct = coremltools_module()
        precisions = {"float16": ct.precision.FLOAT16, "fp16": ct.precision.FLOAT16}
        precisions |= {"float32": ct.precision.FLOAT32, "fp32": ct.precision.FLOAT32}
        return (
            _member(ct.target, self.minimum_deployment_target, "minimum_deployment_target"),
            _choice(precisions, self.compute_precision, "compute_precision"),
            _member(ct.ComputeUnit, self.compute_units, "compute_units"),
        )

    @property
    def precision_name(self) -> str:
        """``"float16"`` or ``"float32"``, whichever way the precision was given."""
        return "float16" if self.resolved()[1] == coremltools_module().precision.FLOAT16 else "float32"

    @property
    def target_name(self) -> str:
        """The deployment target's name (``"iOS18"`` …), whichever way it was given."""
        return self.resolved()[0].name


def _member(enum, value, field_name: str):
    """``value`` as a member of the coremltools enum ``enum`` (given as the member or its name)."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str) and value in enum.__members__:
        return enum.__members__[value]
    raise ConversionError(
        f"unknown {field_name} {value!r} in CoreMLOptions; use one of {list(enum.__members__)} "
        f"(the name, or the member of coremltools' {enum.__name__})"
    )


def _choice(table: dict, value, field_name: str):
    if value in table.values():
        return value
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise ConversionError(
        f"unknown {field_name} {value!r} in CoreMLOptions; use one of {sorted(table)}, or ct.precision"
    )


class _Staged:
    """A package written to a private temporary folder (``root``), removed when the last reference goes."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root

    def __del__(self):
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class CoreMLPackage(Package):
    """An ML Program package: one or several functions (``prefill`` and ``decode`` share one weight
    file) and their states. A single function is held in memory until :meth:`save`; several are
    merged into a package staged in a private temporary folder; a package read back from disk
    (:meth:`CoreMLTarget.load`) keeps its path and reads its MIL program from there."""

    staged: _Staged | None = field(default=None, repr=False)
    #: a package read back from disk: where it is
    loaded_from: Path | None = None
    suffix = ".mlpackage"

    @property
    def mil_program(self):
        """The MIL program of the default function."""
        return self._program(self.default)

    def _program(self, function: str | None):
        """The MIL program holding ``function`` (in memory, or read back from the saved package)."""
        f = self.function(function)
        if self.loaded_from is None:
            return mil_program(f.model)
        if "_read" not in self.__dict__:
            self.__dict__["_read"] = read_program(self.loaded_from)
        return self.__dict__["_read"]

    def operations(self, function: str | None = None) -> list:
        name = "main" if self.loaded_from is None else self.function(function).name
        return list(self._program(function).functions[name].operations)

    def op_histogram(self, function: str | None = None) -> collections.Counter:
        """MIL op types of one function (``const`` excluded: they are weights and literals). Kept
        once counted for a function whose program was released to its package (read back from
        disk otherwise at each call: a chunk of Whisper-large-v3 holds ~1 GB of weights)."""
        key = ("_histogram", self.function(function).name)
        if key in self.__dict__:
            return collections.Counter(self.__dict__[key])
        counts = collections.Counter(op.op_type for op in self.operations(function) if op.op_type != "const")
        if self.loaded_from is not None or released(self.function(function).model):
            self.__dict__[key] = counts
        return collections.Counter(counts)

    @property
    def path(self) -> Path | None:
        """Where the package is on disk (None for a single function held in memory)."""
        return self.staged.path if self.staged is not None else self.loaded_from

    def _description(self, function: str | None):
        spec = self.function(function).model.get_spec()
        described = {f.name: f for f in spec.description.functions}
        return described.get(self.function(function).name, spec.description)

    def input_names(self, function: str | None = None) -> list[str]:
        return [i.name for i in self._description(function).input]

    def output_names(self, function: str | None = None) -> list[str]:
        return [o.name for o in self._description(function).output]

    def states(self) -> dict[str, StateSpec]:
        out = {}
        for function in self.functions:
            for s in self._description(function).state:
                out[s.name] = StateSpec(tuple(int(d) for d in s.type.stateType.arrayType.shape), torch.float16)
        return out

    @staticmethod
    def weight_bytes_at(path: Path) -> int:
        return package_weight_bytes(path)

    def weight_bytes(self) -> int:
        if self.path is not None:
            return package_weight_bytes(self.path)
        return super().weight_bytes()

    def _write(self, path: Path) -> None:
        if self.path is not None:
            shutil.copytree(self.path, path)
        else:
            self.model.save(str(path))
        deterministic_manifest(Path(path))


def read_program(path: Path):
    """The MIL program of a saved package, every function included (the interpreter's reader)."""
    return read_package(path).program


def package_weight_bytes(package: Path) -> int:
    """Bytes of the weight files of a saved ``.mlpackage`` (``Data/com.apple.CoreML/weights``)."""
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0


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


#: ATen overloads torch.export emits whose TorchScript spelling coremltools already converts.
_ALIASES = {"lstm.input": "lstm", "gru.input": "gru", "rnn_tanh.input": "rnn_tanh", "rnn_relu.input": "rnn_relu"}


def _ensure_aliases() -> None:
    """Point export-only overload names at coremltools' existing converters through its public
    ``register_torch_op`` (at conversion time, never on import). Converters it lacks are left alone:
    the conversion error then names the op."""
    from coremltools.converters.mil.frontend.torch import ops, register_torch_op

    for alias, original in _ALIASES.items():
        func = getattr(ops, original, None)
        if func is not None:
            register_torch_op(func, torch_alias=[alias], override=True)  # re-registers ``original`` as is


def _convert_channel_layer_norm(context, node):
    """``anefx::channel_layer_norm`` → one MIL ``layer_norm`` over axis 1."""
    from coremltools.converters.mil import Builder as mb

    x, weight, bias, eps = torch_node_inputs(context, node, expected=4)
    eps = 1e-5 if eps is None else float(eps.val)
    context.add(mb.layer_norm(x=x, axes=[1], gamma=weight, beta=bias, epsilon=eps, name=node.name))


def _convert_instance_norm(context, node):
    """``anefx::instance_norm_4d`` → one MIL ``instance_norm`` (no gamma/beta)."""
    from coremltools.converters.mil import Builder as mb

    x, eps = torch_node_inputs(context, node, expected=2)
    context.add(mb.instance_norm(x=x, epsilon=float(eps.val), name=node.name))


def _convert_cache_write(context, node):
    """``anefx::cache_write`` → one MIL ``slice_update`` at run-time begin/end: the column at the
    position along ``axis`` (on a state: written in place)."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    cache, update, position, axis = torch_node_inputs(context, node, expected=4)
    axis, rank = int(axis.val), cache.rank
    start = mb.cast(x=mb.slice_by_index(x=mb.reshape(x=position, shape=[-1]), begin=[0], end=[1]), dtype="int32")
    parts = [np.zeros(axis, np.int32), start, np.zeros(rank - axis - 1, np.int32)]
    begin = mb.concat(values=[p for p in parts if not isinstance(p, np.ndarray) or p.size], axis=0)
    end = mb.add(x=begin, y=np.array(update.shape, np.int32))
    context.add(mb.slice_update(x=cache, update=update, begin=begin, end=end, name=node.name))


#: anefx's own torch ops and their Core ML converters
_ANEFX_CONVERTERS = {
    "channel_layer_norm": _convert_channel_layer_norm,
    "instance_norm_4d": _convert_instance_norm,  # not "instance_norm": that alias is aten.instance_norm's
    "cache_write": _convert_cache_write,
}


def _ensure_anefx_ops() -> None:
    """Register the converters of anefx's own torch ops (:mod:`anefx.ir.ops`) through coremltools'
    public ``register_torch_op``, at conversion time (never on import); registering again is a no-op."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    for name, converter in _ANEFX_CONVERTERS.items():
        op = getattr(torch.ops.anefx, name).default
        # the converter looks ops up by their qualified name (``anefx::channel_layer_norm``), the
        # support query ``is_torch_fx_node_supported`` by ``__name__`` (``channel_layer_norm.default``)
        kinds = sorted({sanitize_op_kind(op.name()), sanitize_op_kind(op.__name__)})
        register_torch_op(converter, torch_alias=kinds, override=True)


def _output_nodes(ep) -> list[str | None]:
    """The name of the node each output of ``ep``'s graph is (None for a constant output)."""
    out = next(n for n in ep.graph.nodes if n.op == "output")
    return [a.name if isinstance(a, torch.fx.Node) else None for a in out.args[0]]


def _unconvertible(ep) -> list[str]:
    """ATen ops of ``ep`` coremltools' torch frontend has no converter for, asked through its public
    ``is_torch_fx_node_supported`` (in-place ops, which it asserts on, are its states: convertible)."""
    from coremltools.converters.mil.frontend.torch import is_torch_fx_node_supported

    missing = []
    with warnings.catch_warnings():  # it looks ops up through a deprecated ``__contains__``
        warnings.simplefilter("ignore")
        for node in ep.graph.nodes:
            if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0].endswith("_"):
                continue
            if not is_torch_fx_node_supported(node):
                missing.append(str(node.target))
    return missing


def register_converters() -> None:
    """Everything anefx adds to coremltools' torch frontend, registered at conversion time (never on
    import): converters for anefx's own ops and aliases for export-only overload names."""
    _ensure_aliases()
    _ensure_anefx_ops()


def deterministic_manifest(package: Path) -> None:
    """Make a saved package reproducible: coremltools names its items with random UUIDs and protobuf
    writes map fields in hash order. Derive the UUIDs from the content and serialize the spec
    deterministically, so compiling the same model twice gives byte-identical packages (only the
    ``conversion_date`` coremltools writes into the metadata changes with the day)."""
    import hashlib
    import json
    import uuid

    manifest = package / "Manifest.json"
    data = json.loads(manifest.read_text())
    # protobuf writes map fields in hash order: serialize the spec deterministically
    from coremltools.proto import Model_pb2

    for item in data.get("itemInfoEntries", {}).values():
        spec_file = package / "Data" / item["path"]
        if spec_file.suffix == ".mlmodel" and spec_file.is_file():
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_file.read_bytes())
            spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    renames = {}
    for old, item in data.get("itemInfoEntries", {}).items():
        target = package / "Data" / item["path"]
        digest = hashlib.sha256(item["path"].encode())
        files = sorted(target.rglob("*")) if target.is_dir() else [target]
        for f in files:
            if f.is_file():
                digest.update(hashlib.sha256(f.read_bytes()).digest())
        renames[old] = str(uuid.uuid5(uuid.NAMESPACE_URL, digest.hexdigest())).upper()
    data["itemInfoEntries"] = {renames[k]: v for k, v in data["itemInfoEntries"].items()}
    data["rootModelIdentifier"] = renames.get(data.get("rootModelIdentifier"), data.get("rootModelIdentifier"))
    manifest.write_text(json.dumps(data, indent=4, sort_keys=True))


class CoreMLTarget(Target):
    name = "coreml"
    Options = CoreMLOptions
    suffix = ".mlpackage"
    capabilities = Capabilities(
        states=True,
        multiple_functions=True,
        compression=frozenset(SCHEMES),
        chunks=True,
        executor="mil",
        runtimes=frozenset({"mil", "coreml"}),
        program="mil",
    )

    def __init__(self, options: CoreMLOptions | None = None):
        super().__init__(options)
        self.options.resolved()  # a bad option fails now, before any long work

    @property
    def precision(self) -> str:
        return self.options.precision_name

    def default_cap_mb(self) -> float:
        """1,024 MB for iOS-family deployment targets, 2,048 MB for macOS (the sizes above which
        exports fail or leave the ANE, as users report them)."""
        return 2048.0 if self.options.target_name.startswith("macOS") else 1024.0

    def for_compression(self, compression, explicit_options: bool) -> CoreMLTarget:
        """Grouped-channel LUTs need iOS18: without explicit options the deployment target is raised to
        iOS18, an explicit earlier one is refused with the reason."""
        super().for_compression(compression, explicit_options)
        target = self
        if not explicit_options and needs_ios18(compression):
            target = CoreMLTarget(dataclasses.replace(self.options, minimum_deployment_target="iOS18"))
        check_deployment_target(compression, target.options.target_name)
        return target

    def for_program(self, *, states: bool = False, functions: int = 1) -> CoreMLTarget:
        super().for_program(states=states, functions=functions)
        return self.for_states() if states else self

    def with_fp32_nodes(self, nodes) -> CoreMLTarget:
        """This target with the MIL ops of the torch nodes ``nodes`` computed in fp32 (an fp16 program's
        fallback for a region that overflows)."""
        return CoreMLTarget(dataclasses.replace(self.options, fp32_nodes=frozenset(nodes)))

    def for_states(self) -> CoreMLTarget:
        """This target for a program with states: Core ML states need iOS18 / macOS15."""
        ct = coremltools_module()
        deployment = self.options.resolved()[0]
        if deployment >= ct.target.iOS18:
            return self
        return CoreMLTarget(dataclasses.replace(self.options, minimum_deployment_target=ct.target.iOS18))

    def convert(self, program: ProgramSpec, events: Events | None = None) -> CoreMLPackage:
        self.require(states=program.stateful, functions=len(program.functions))
        target = self.for_states() if program.stateful else self
        events = events_of(events)
        functions = {}
        for name, handoff in program.functions.items():
            with events.stage(name) if len(program.functions) > 1 else contextlib.nullcontext():
                functions[name] = target._convert_function(name, handoff, program, events)
            if list(program.functions) != ["main"]:  # merged from the saved packages: no need to hold the weights
                drop_in_memory_program(functions[name].model)
        return target.package(functions, program)

    def package(self, functions: dict[str, ConvertedFunction], program: ProgramSpec) -> CoreMLPackage:
        # one function named otherwise (an encoder-decoder's encoder chunk holds only ``encode``) is a
        # multifunction package of one, so that it keeps its name on disk
        if list(functions) == ["main"]:
            (function,) = functions.values()
            if program.metadata:
                function.model.user_defined_metadata.update(program.metadata)
            return CoreMLPackage(functions, function.model, program.default, dict(program.metadata))
        model, staged = merge(functions, program.metadata, program.default)
        return CoreMLPackage(functions, model, program.default, dict(program.metadata), staged=staged)

    def _exported(self, handoff: HandOff, program: ProgramSpec, events: Events):
        """The program coremltools reads, and the pure graph it computes (what is validated)."""
        opts: CoreMLOptions = self.options
        if handoff.stateful:  # states as buffers written in place: torch.export records the writes
            for reexport in (False, True):  # the trial export of the legalization only when needed
                wrapper = stateful_module(legalized_clone(handoff, reexport=reexport), handoff, program.states)
                try:
                    with torch.no_grad():
                        ep = torch.export.export(wrapper, tuple(handoff.value_examples()), strict=False)
                        ep = ep.run_decompositions({})
                    break
                except Exception as exc:
                    if reexport:
                        raise ConversionError(
                            f"exporting the stateful function failed: {type(exc).__name__}: {exc}"
                        ) from exc
            return ep, functional_view(ep, handoff)
        ep = lifted_program(legalized_clone(handoff, reexport=False)) if opts.fast_conversion else None
        if ep is not None and _unconvertible(ep):  # ops only their decompositions spell for coremltools
            ep = keep_input_names(ep, ep.run_decompositions({}))
        if ep is None:
            gm = legalized_clone(handoff)
            try:
                ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
                ep = ep.run_decompositions({})
            except Exception as exc:
                raise ConversionError(f"re-exporting the rewritten graph failed: {type(exc).__name__}: {exc}") from exc
        return ep, ep.module()

    def _convert_function(self, name: str, handoff: HandOff, program: ProgramSpec, events: Events) -> ConvertedFunction:
        ct = coremltools_module()
        opts: CoreMLOptions = self.options
        register_converters()  # before asking which ops coremltools lacks: anefx's own ops are covered
        with events.stage("export"):
            ep, handed = self._exported(handoff, program, events)
        with events.stage("check_converter_input"):
            check_converter_input(handoff, handed)
        target, precision, units = opts.resolved()
        outputs = [ct.TensorType(name=n) for n in handoff.value_outputs]
        if opts.fp32_nodes:  # an output the fp16 fallback computes in fp32 is not cast back to fp16
            outputs = [
                ct.TensorType(name=t.name, dtype=np.float32) if node in opts.fp32_nodes else t
                for t, node in zip(outputs, _output_nodes(ep), strict=False)
            ]
        kwargs = dict(opts.convert_kwargs)
        fp16 = opts.precision_name == "float16"
        selector = fp32_selector([n.name for n in ep.graph.nodes], opts.fp32_nodes) if opts.fp32_nodes else None
        if "pass_pipeline" not in kwargs and (opts.fast_conversion or handoff.stateful):
            kwargs["pass_pipeline"] = pass_pipeline(
                ct, fp16, fast=opts.fast_conversion, states=handoff.stateful, op_selector=selector
            )
        elif selector is not None and fp16:
            precision = ct.transform.FP16ComputePrecision(op_selector=selector)
        with events.stage("ct_convert"):
            try:
                # names coremltools makes up stay off the graph's: a MIL name equal to a node's is its op
                with warnings.catch_warnings(), quiet_coremltools(), names_apart(n.name for n in ep.graph.nodes):
                    warnings.simplefilter("ignore")
                    mlmodel = ct.convert(
                        ep,
                        convert_to="mlprogram",
                        minimum_deployment_target=target,
                        compute_precision=precision,
                        compute_units=units,
                        outputs=outputs,
                        skip_model_load=handoff.stateful or not runtime_available()[0],
                        **kwargs,
                    )
            except Exception as exc:
                where = f"{name}: " if len(program.functions) > 1 else ""
                raise ConversionError(where + explain_failure(exc, ep, handoff.graph_module)) from exc
        seconds = events.events[-1].seconds  # the ct_convert stage just ended
        wrapped = "function." if handoff.stateful else ""

        def param_name(target: str) -> str:
            return handoff.user_param_name(target.removeprefix(wrapped))

        return ConvertedFunction(name, mlmodel, seconds, ep, handed, param_name)

    def executor(self, package: CoreMLPackage, runtime: str | None = None) -> LoadedProgram:
        """``package`` ready to run: anefx's MIL interpreter (``"mil"``, the default, any OS) or Core ML
        itself (``"coreml"``, macOS), both reading the bytes :meth:`CoreMLPackage.save` writes."""
        runtime = self.runtime(runtime)
        path = package.path if package.path is not None else Path(package.model.package_path)
        if runtime == "coreml":
            return CoreMLProgram(path)
        return MILProgram.open(path) if package.path is not None else MILProgram.from_mlmodel(package.model)

    def load(self, path: Path) -> CoreMLPackage:
        ct = coremltools_module()
        path = Path(path)
        spec = ct.utils.load_spec(str(path))
        names = [f.name for f in spec.description.functions] or ["main"]
        with warnings.catch_warnings(), quiet_coremltools():
            warnings.simplefilter("ignore")
            models = {
                n: ct.models.MLModel(
                    str(path), skip_model_load=True, **({"function_name": n} if len(names) > 1 else {})
                )
                for n in names
            }
        functions = {n: ConvertedFunction(n, m) for n, m in models.items()}
        default = spec.description.defaultFunctionName or names[0]
        metadata = dict(spec.description.metadata.userDefined)
        return CoreMLPackage(functions, models[default], default, metadata, loaded_from=path)


def merge(functions: dict[str, ConvertedFunction], metadata: dict[str, str], default: str):
    """Several converted functions as one package (coremltools' ``save_multifunction`` stores each
    weight the functions share once) with ``metadata``; returns its model and staged folder."""
    ct = coremltools_module()
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    tmp = Path(tempfile.mkdtemp(prefix="anefx-package-"))
    try:
        desc = MultiFunctionDescriptor()
        for name, fn in functions.items():
            single = tmp / f"{name}.mlpackage"
            fn.model.save(str(single))
            desc.add_function(str(single), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        merged = tmp / "merged.mlpackage"
        with warnings.catch_warnings(), quiet_coremltools():
            warnings.simplefilter("ignore")
            save_multifunction(desc, str(merged))
            model = ct.models.MLModel(str(merged), skip_model_load=True)
            model.user_defined_metadata.update(metadata)
            if "co.huggingface.exporters.name" in metadata:
                model.short_description = metadata["co.huggingface.exporters.name"]
            final = tmp / "package" / "model.mlpackage"
            final.parent.mkdir()
            model.save(str(final))
        for name in functions:
            shutil.rmtree(tmp / f"{name}.mlpackage", ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, _Staged(final, tmp)


def explain_failure(exc: BaseException, ep, gm: torch.fx.GraphModule) -> str:
    """Name the op coremltools choked on and where it came from in the user's code."""
    text = str(exc)
    m = re.search(r"Unsupported fx node (\w+), kind (\S+)", text) or re.search(r'Op "(\w+)"', text)
    node = None
    if m:
        name = m.group(1)
        node = next((n for n in ep.graph.nodes if n.name == name), None)
        node = next((n for n in gm.graph.nodes if n.name == name), node)
    where = f" at {describe(node)}" if node is not None else ""
    hint = (
        "anefx could not legalize this op for coremltools; rewrite it in the model, or add a pass "
        "that lowers it (see passes_catalog/), or report it with the dump from ANEFX_DUMP_DIR"
    )
    first = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return f"coremltools failed to convert{where}: {type(exc).__name__}: {first}. {hint}"
