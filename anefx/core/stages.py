"""The one sequence of stages every front end runs.

A front end says which functions and states to build (:class:`ProgramRequest`: one
:class:`FunctionSpec` per function, the states they read and write, the package metadata); the
stages do the rest, the same way for every front end:

1. ``capture`` each function (:func:`anefx.ir.capture.capture`);
2. ``passes``: the pipeline, validated pass by pass, then the never-worse ``guard``;
3. hand-off: each function's validated graph with its validator (:class:`HandOff`), the LM head
   split when asked;
4. ``chunk``: the program split into a chain under the size cap (when there is one);
5. ``convert``: every package with the target, each function's converter input validated
   (``report.conversion`` gives its error per function);
6. ``artifact``: every package executed with the target's executor on the validation's input sets
   and compared with the model (:mod:`anefx.core.artifact_check`; ``report.artifact``), located and
   fixed (fp16 fallback) or refused when it differs;
7. ``compress``: every function of every package, when asked; the compressed packages executed too.

The result is a :class:`Build`: per function its capture, pipeline result and report, and the
:class:`~anefx.targets.artifact.Artifact`. Every stage is timed by the one instrument,
:class:`~anefx.driver.events.Events`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from anefx.compat.coremltools import forget_read_back
from anefx.compat.torch import tree_leaves, write_count
from anefx.core.artifact_check import check_compressed, check_converted
from anefx.core.options import Plan
from anefx.driver.events import Events
from anefx.driver.guard import never_worse as guard
from anefx.driver.guard import stock_pipeline
from anefx.driver.pipeline import PipelineResult
from anefx.driver.report import Report
from anefx.driver.validate import Tolerance, ValidationOptions
from anefx.ir.capture import Captured, capture
from anefx.ir.errors import CaptureError, ConversionError
from anefx.targets.artifact import Artifact, Program
from anefx.targets.chunking import split_artifact
from anefx.targets.handoff import HandOff, StateSpec
from anefx.targets.lm_head import split_handoff

#: per-function tolerances from its capture: ``(captured, validation options) -> tolerances``
Tolerances = Callable[[Captured, ValidationOptions], Mapping[torch.dtype, Tolerance]]


@dataclass
class FunctionSpec:
    """One function a front end asks for.

    ``model``, ``args``, ``kwargs``: what :func:`~anefx.ir.capture.capture` takes. ``input_names`` /
    ``output_names`` name its flat inputs and outputs (default: the captured names);
    ``states_in`` / ``states_out`` map some of them to the program's states. ``reference``:
    ``"model"`` validates against the model's own outputs at capture, ``"graph"`` against the
    captured graph's (when eager and exported kernels differ in the last bits; the eager outputs,
    read only to scale the tolerances, are then released once the passes are done). ``tolerances``
    scales the validation tolerances to this function (applied when no ``ValidationOptions`` were
    given). ``param_prefix``: what the captured parameter names have that the user's lack (a
    wrapper's attribute)."""

    name: str
    model: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    states_in: dict[str, str] = field(default_factory=dict)
    states_out: dict[str, str] = field(default_factory=dict)
    reference: str = "model"
    tolerances: Tolerances | None = None
    param_prefix: str = ""


@dataclass
class ProgramRequest:
    """What a front end asks the stages to build: functions sharing weights, the states they read
    and write, and the metadata written into the package."""

    functions: list[FunctionSpec]
    states: dict[str, StateSpec] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    default: str = ""
    #: chunking: a parameter's stage (default: its layer index) and the stages where a layer stack
    #: starts, which no chunk runs across (see :func:`anefx.targets.chunking.split_artifact`)
    stage_of: Callable[[str], int | None] | None = None
    stage_breaks: tuple[int, ...] = ()


@dataclass
class BuiltFunction:
    """One function through the stages."""

    name: str
    captured: Captured
    result: PipelineResult  #: what ships (after the guard)
    unguarded: PipelineResult  #: the passes' own output (the guard's fallback)
    report: Report
    handoff: HandOff  #: what the target got (the LM head split when asked)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.result.graph_module


@dataclass
class Build:
    """The stages' result: every function, the artifact, the resolved options and the events."""

    functions: dict[str, BuiltFunction]
    artifact: Artifact
    plan: Plan
    events: Events
    timings: dict[str, float] = field(default_factory=dict)


def _sub(events: Events, name: str, several: bool):
    return events.stage(name) if several else contextlib.nullcontext()


def run_passes(
    spec: FunctionSpec, captured: Captured, plan: Plan, events: Events
) -> tuple[PipelineResult, PipelineResult, dict]:
    """The pipeline on one captured function, then the never-worse guard; ``(result, unguarded,
    guard info)``."""
    pipeline = plan.pipeline
    if spec.tolerances is not None and plan.options.validation is None:
        pipeline = pipeline.with_validation(tolerances=spec.tolerances(captured, pipeline.validation))
    references = captured.reference_outputs if spec.reference == "model" else None

    def run(refused=None, pipeline=pipeline):
        if refused:
            events.step("rerun", sites=sum(map(len, refused.values())))
        return pipeline.run(
            captured.graph_module,
            captured.flat_inputs,
            reference_outputs=references,
            debug=plan.debug,
            events=events,
            precision=plan.target.precision,
            refused=refused,
        )

    result = unguarded = run()
    info: dict = {}
    if plan.options.never_worse and pipeline.passes and plan.debug.bisect_limit is None:  # bisecting: as they ran
        with events.stage("guard"):
            outcome = guard(
                captured.graph_module, result, run, stock_form=lambda: run(pipeline=stock_pipeline(pipeline))
            )
        result, info = outcome.result, outcome.info
        info["seconds"] = round(events.events[-1].seconds or 0.0, 3)
    # the passes are done. In the ``example`` mode (models where a run costs minutes, and whose
    # references are gigabytes) the later checks read the sets after the example at most once each
    # (the artifact check of an unchunked program; a chunked one never reads them), so those
    # references are recomputed then rather than held from here to the end of the compile, through
    # the other functions' passes and the conversion. In ``numeric`` mode each legalization step and
    # the converter-input check read every set again: they stay held.
    if pipeline.validation.mode == "example":
        for done in (result, unguarded):
            if done.validator is not None:
                done.validator.release_references()
    return result, unguarded, info


def _handoff(
    spec: FunctionSpec, built_capture: Captured, result: PipelineResult, plan: Plan, report: Report
) -> HandOff:
    handoff = HandOff(
        graph_module=result.graph_module,
        example_args=built_capture.example_args,
        example_kwargs=built_capture.example_kwargs,
        input_names=list(spec.input_names or built_capture.input_names),
        output_names=list(spec.output_names or built_capture.output_names),
        validator=result.validator,
        states_in=dict(spec.states_in),
        states_out=dict(spec.states_out),
        param_prefix=spec.param_prefix,
    )
    if not plan.convert:
        return handoff
    handoff, head = split_handoff(handoff, built_capture.flat_inputs, plan.options.lm_head)
    if head is not None:
        report.conversion["lm_head"] = head
    return handoff


def build(request: ProgramRequest, plan: Plan, events: Events) -> Build:
    """Run every stage for ``request`` with ``plan`` (see the module docstring)."""
    several = len(request.functions) > 1
    functions: dict[str, BuiltFunction] = {}
    examples = _example_writes(request)
    for spec in request.functions:
        with events.stage("capture"), _sub(events, spec.name, several):
            captured = capture(spec.model, spec.args, spec.kwargs)
        with (
            events.stage("passes", passes=len(plan.pipeline.passes), function=spec.name),
            _sub(events, spec.name, several),
        ):
            result, unguarded, info = run_passes(spec, captured, plan, events)
        if spec.reference == "graph":
            captured.release_reference_outputs(
                f"{spec.name} was validated against its captured graph's outputs (run it for them)"
            )
        report = Report(result.records, guard=info)
        handoff = _handoff(spec, captured, result, plan, report)
        functions[spec.name] = BuiltFunction(spec.name, captured, result, unguarded, report, handoff)
        _check_unwritten(examples, spec.name)
        collect()  # the graphs the passes, their bisections and the guard's reruns discarded
    artifact = _artifact(request, functions, plan)
    if plan.convert:
        try:
            artifact = _convert(artifact, plan, events)
        except ConversionError as exc:
            artifact = _fallback(exc, request, functions, plan, events)
        reports = {fn: b.report for fn, b in functions.items()}
        with events.stage("artifact", mode=plan.artifact_check.mode):
            artifact = check_converted(artifact, reports, plan.artifact_check, events)
        _conversion_reports(functions, artifact, plan, events)
        forget_read_back()  # the last program read back for the op counts (a chunk's weights)
        if plan.compression is not None:
            artifact = artifact.compressed(plan.compression, events)
            for fn, built in functions.items():
                built.report.conversion["compression"] = artifact.compression.functions[fn].quality.summary()
            with events.stage("artifact.compressed"):
                check_compressed(artifact, reports, plan.artifact_check, events)
    timings = events.timings()
    timings["passes.validation"] = sum(r.validation_seconds for b in functions.values() for r in b.report.records)
    timings["total"] = events.total
    for built in functions.values():
        built.report.timings = dict(timings)
    return Build(functions, artifact, plan, events, timings)


def _example_writes(request: ProgramRequest) -> list[tuple[str, int, torch.Tensor, int]]:
    """Every example tensor of every function with its write count now. Functions may share
    example tensors (an encoder-decoder's prefill and decode share one set of states)."""
    out = []
    for spec in request.functions:
        leaves = tree_leaves((spec.args, spec.kwargs))
        out += [(spec.name, i, t, write_count(t)) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    return out


def _check_unwritten(examples: list[tuple[str, int, torch.Tensor, int]], stage: str) -> None:
    """Raise when building ``stage`` wrote into an example tensor (the model's eager run at capture
    writing into its inputs): a function sharing it would be validated against corrupted inputs."""
    written = [f"{fn} input #{i}" for fn, i, t, count in examples if write_count(t) != count]
    if written:
        raise CaptureError(
            f"building {stage} wrote into the example inputs {written} (the model writes into its inputs in "
            "place); functions that share them would be validated against changed values"
        )


def _artifact(request: ProgramRequest, functions: dict[str, BuiltFunction], plan: Plan) -> Artifact:
    handoffs = {name: b.handoff for name, b in functions.items()}
    program = Program(
        handoffs,
        dict(request.states),
        dict(request.metadata),
        request.default,
        stage_of=request.stage_of,
        stage_breaks=request.stage_breaks,
    )
    return Artifact.single(program, plan.target)


def _convert(artifact: Artifact, plan: Plan, events: Events) -> Artifact:
    if plan.cap_mb is not None:
        with events.stage("chunk", max_chunk_mb=plan.cap_mb):
            artifact = split_artifact(artifact, plan.cap_mb, plan.bytes_per_weight)
    collect()  # the whole graphs' exports and partitions the split discarded
    with events.stage("convert", target=plan.target.name, packages=len(artifact.programs)):
        for program in artifact.programs:
            with _sub(events, f"chunk{program.index}", artifact.chunked):
                program.package = plan.target.convert(program, events)
            collect()  # the converter's programs (coremltools' MIL: cycles holding the weights)
    return artifact


def collect() -> None:
    """Collect the cyclic garbage at a stage boundary. FX graphs (nodes linked both ways, each graph
    and its module) and coremltools' MIL programs (``Var`` and ``Operation`` pointing at each other)
    are freed only by a collection of the oldest generation, which Python runs rarely in a process
    holding millions of objects: each discarded graph module, export and converted program (with
    its weights, for coremltools) would stay until then. One full collection costs well under a
    stage: 0.2 s over the 0.6 M objects Whisper-base's build holds after its passes (about five
    times as many objects expected at Whisper-large-v3)."""
    gc.collect()


def _fallback(exc: ConversionError, request, functions: dict[str, BuiltFunction], plan: Plan, events: Events):
    """The regions the guard kept in their original form do not convert (e.g. an LSTM's outputs
    read directly by a linear, which coremltools rejects as the stock model): the passes' output did
    get further, and a model that converts beats one with fewer copies."""
    guarded = [b for b in functions.values() if b.result is not b.unguarded]
    if not guarded:
        raise exc
    why = str(exc).split(". ")[0]
    for b in guarded:
        b.result = b.unguarded
        b.report.records = b.result.records
        b.report.guard["fallback"] = f"the kept form does not convert ({why}): shipped the passes' output"
        b.report.conversion.pop("lm_head", None)
    specs = {s.name: s for s in request.functions}
    for b in guarded:
        b.handoff = _handoff(specs[b.name], b.captured, b.result, plan, b.report)
    return _convert(_artifact(request, functions, plan), plan, events)


def _conversion_reports(functions: dict[str, BuiltFunction], artifact: Artifact, plan: Plan, events: Events) -> None:
    """Each function's report: target, seconds, the converter-input error (the worst over the
    chain), the converted ops and what the target checked."""
    seconds = events.timings().get("convert", 0.0)
    for fn, built in functions.items():
        holding = artifact.holding(fn)
        checks = [p.functions[fn].checks for p in holding]
        conversion = {"target": plan.target.name, "seconds": round(seconds, 3)}
        if artifact.chunked:
            conversion |= {"chunks": len(artifact.programs), "max_chunk_mb": artifact.cap_mb}
        conversion |= converter_input_errors(checks)
        conversion["ops"] = dict(sorted(artifact.op_histogram(fn).items()))
        conversion["checks"] = (
            checks[0] if len(checks) == 1 else {f"chunk{p.index}": c for p, c in zip(holding, checks, strict=True)}
        )
        built.report.conversion |= conversion


def converter_input_errors(checks: list[dict]) -> dict:
    """The error of the graphs actually handed to the converter (the worst over a chain's packages),
    for the report's summary line."""
    found = [c.get("converter_input") for c in checks]
    measured = [f for f in found if isinstance(f, dict)]
    if not measured:
        first = next((f for f in found if f), None)
        return {"converter_input": first} if first else {}
    return {
        "converter_input_max_abs_error": f"{max(f['max_abs_error'] for f in measured):.2e}",
        "converter_input_max_rel_error": f"{max(f['max_rel_error'] for f in measured):.2e}",
    }
