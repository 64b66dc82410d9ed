"""Core ML hand-off: the validated graph → coremltools → ML Program (``.mlpackage``).

Route: legalize a clone of the graph (respell ops coremltools 9 rejects, fold input-independent
subgraphs) → an ``ExportedProgram`` lifted from it directly (:mod:`anefx.targets.lift`; a fresh
``torch.export`` + ``run_decompositions({})`` when that is not possible, or with
``fast_conversion=False``) → ``ct.convert`` (mlprogram, fp16, ``CPU_AND_NE``) with coremltools'
default MIL pipeline and equivalent faster passes (:mod:`anefx.targets.mil_pipeline`). Inputs keep
the model's argument names, outputs the model's output names.

Running the model (``predict``) and ``MLComputePlan`` need macOS; :func:`runtime_available` says
whether this machine has them, and callers skip with its reason elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import platform
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

import anefx.ir.ops  # noqa: F401 - defines the anefx:: torch ops this target converts
from anefx.compat.coremltools import mil_program, torch_node_inputs
from anefx.ir.errors import ConversionError, TargetUnavailableError
from anefx.ir.graph import describe
from anefx.targets.base import Artifact, HandOff, Target, check_converter_input, legalized_clone
from anefx.targets.lift import keep_input_names, lifted_program
from anefx.targets.mil_pipeline import pass_pipeline


def coremltools_module():
    with warnings.catch_warnings(), quiet_coremltools(progress_bars=True):
        warnings.simplefilter("ignore")
        try:
            import coremltools as ct
        except ImportError as exc:  # pragma: no cover - coremltools is a hard dependency
            raise TargetUnavailableError("the Core ML target needs coremltools: pip install coremltools") from exc
    return ct


@contextlib.contextmanager
def quiet_coremltools(progress_bars: bool = False):
    """Silence coremltools' chatter while it imports or converts.

    Its messages (no native libs on Linux, untested torch, unsupported scikit-learn) go through its own
    ``coremltools`` logger, and only that logger is lowered. Its progress bars are tqdm bars on
    ``sys.stderr`` with no switch (tqdm reads ``TQDM_DISABLE`` once, at import), so while converting
    stderr is redirected too unless ``progress_bars`` is True."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.nullcontext() if progress_bars else contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


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


@dataclass
class CoreMLArtifact(Artifact):
    exported_graph: torch.fx.GraphModule | None = None
    #: the program ct.convert read (its node names are the MIL names; compression measures with it)
    exported_program: torch.export.ExportedProgram | None = None
    suffix = ".mlpackage"

    @property
    def mil_program(self):
        return mil_program(self.model)

    def operations(self) -> list:
        return list(self.mil_program.functions["main"].operations)

    def op_histogram(self) -> collections.Counter:
        """MIL op types of the main function (``const`` excluded: they are weights and literals)."""
        return collections.Counter(op.op_type for op in self.operations() if op.op_type != "const")

    def _write(self, path: Path) -> None:
        self.model.save(str(path))
        deterministic_manifest(Path(path))

    def predict(self, inputs: dict):
        ok, why = runtime_available()
        if not ok:
            raise TargetUnavailableError(why)
        return self.model.predict(inputs)


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
    """``anefx::instance_norm`` → one MIL ``instance_norm`` (no gamma/beta)."""
    from coremltools.converters.mil import Builder as mb

    x, eps = torch_node_inputs(context, node, expected=2)
    context.add(mb.instance_norm(x=x, epsilon=float(eps.val), name=node.name))


def _ensure_anefx_ops() -> None:
    """Register the converters of anefx's own torch ops (:mod:`anefx.ir.ops`) through coremltools'
    public ``register_torch_op``, at conversion time (never on import); registering again is a no-op."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    for op, convert in (
        (torch.ops.anefx.channel_layer_norm.default, _convert_channel_layer_norm),
        (torch.ops.anefx.instance_norm.default, _convert_instance_norm),
    ):
        # the converter looks ops up by their qualified name (``anefx::channel_layer_norm``), the
        # support query ``is_torch_fx_node_supported`` by ``__name__`` (``channel_layer_norm.default``)
        kinds = sorted({sanitize_op_kind(op.name()), sanitize_op_kind(op.__name__)})
        register_torch_op(convert, torch_alias=kinds, override=True)


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

    def __init__(self, options: CoreMLOptions | None = None):
        super().__init__(options)
        self.options.resolved()  # a bad option fails now, before any long work

    def convert(self, handoff: HandOff) -> CoreMLArtifact:
        ct = coremltools_module()
        opts: CoreMLOptions = self.options
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        register_converters()  # before asking which ops coremltools lacks: anefx's own ops are covered
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
        timings["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        handed = ep.module()
        check_converter_input(handoff, handed)
        timings["check_converter_input"] = time.perf_counter() - t0
        target, precision, units = opts.resolved()
        outputs = [ct.TensorType(name=n) for n in handoff.output_names]
        kwargs = dict(opts.convert_kwargs)
        if "pass_pipeline" not in kwargs and opts.fast_conversion:
            kwargs["pass_pipeline"] = pass_pipeline(ct, fp16=opts.precision_name == "float16")
        register_converters()
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(), quiet_coremltools():
                warnings.simplefilter("ignore")
                mlmodel = ct.convert(
                    ep,
                    convert_to="mlprogram",
                    minimum_deployment_target=target,
                    compute_precision=precision,
                    compute_units=units,
                    outputs=outputs,
                    skip_model_load=not runtime_available()[0],
                    **kwargs,
                )
        except Exception as exc:
            raise ConversionError(explain_failure(exc, ep, handoff.graph_module)) from exc
        seconds = time.perf_counter() - t0
        timings["ct_convert"] = seconds
        artifact = CoreMLArtifact(model=mlmodel, seconds=seconds, info={"convert_seconds": seconds, "timings": timings})
        artifact.converter_input = handed
        artifact.exported_graph = ep.graph_module  # MIL op names come from these nodes' names
        artifact.exported_program = ep
        return artifact


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
