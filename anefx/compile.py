"""``anefx.compile``: capture → pipeline (validated pass by pass) → target. The one place that joins them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.ane.report import add_unmatched_attention, analyse
from anefx.driver.debug import DebugOptions, validate_mode_from_env
from anefx.driver.guard import never_worse as guard
from anefx.driver.guard import stock_pipeline
from anefx.driver.pipeline import Pipeline
from anefx.driver.report import Report
from anefx.driver.validate import ValidationOptions, run_flat
from anefx.ir.capture import Captured, capture
from anefx.ir.errors import AnefxError, ConversionError
from anefx.targets.base import Artifact, HandOff
from anefx.targets.registry import target_by_name


@dataclass
class CompiledModel:
    """The result of :func:`anefx.compile`.

    ``graph_module`` is the rewritten graph; it runs in PyTorch with the model's inputs and returns
    the model's output structure. ``artifact`` is the target's converted model (``mlmodel`` for Core
    ML). ``report`` holds one record per pass. ``timings`` holds the seconds of every stage:
    ``capture``, ``passes`` (of which ``passes.validation``), ``convert`` (of which ``convert.export``,
    building the program handed to the converter, and ``convert.ct_convert``) and ``total``.
    """

    graph_module: torch.fx.GraphModule
    report: Report
    captured: Captured
    artifact: Artifact | None = None
    target: str = "coreml"
    timings: dict[str, float] = field(default_factory=dict)
    #: the weight compression applied (``compression=``): plan, measured quality, reference model
    compression: Any = None
    #: the chain of packages when the model was split (``max_chunk_mb=``); ``artifact`` is then None
    chunks: Any = None

    def __call__(self, *args, **kwargs):
        """Run the rewritten graph. Inputs specialised at capture (``use_cache=False`` …) may be
        given again with the same value or left out; a different value raises ``CaptureError``."""
        args, kwargs = self.captured.constants.strip(args, kwargs)
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    @property
    def mlmodel(self):
        """The coremltools ``MLModel`` (Core ML target only)."""
        if self.target != "coreml" or self.artifact is None:
            raise AttributeError(
                f"no Core ML model: this was compiled for target={self.target!r}, convert={self.artifact is not None}"
            )
        return self.artifact.model

    @property
    def ane_report(self):
        """The ANE readiness report (:func:`anefx.check`) of this compile; computed on first use."""
        if "_ane_report" not in self.__dict__:
            if self.target != "coreml" or (self.artifact is None and self.chunks is None):
                raise ValueError("the ANE report reads a Core ML program: compile with target='coreml', convert=True")
            parts = None
            if self.chunks is not None:
                parts = [(c.artifact, c.graph_module, f"chunk{c.index}") for c in self.chunks.chunks]
            report = analyse(self.artifact, self.graph_module, self.captured.flat_inputs, parts)
            add_unmatched_attention(report, self.report.records)
            self.__dict__["_ane_report"] = report
        return self.__dict__["_ane_report"]

    def op_histogram(self):
        if self.chunks is not None:
            import collections

            return sum((c.artifact.op_histogram() for c in self.chunks.chunks), collections.Counter())
        if self.artifact is None:
            raise AttributeError("compiled with convert=False: there is no converted program to inspect")
        return self.artifact.op_histogram()

    def save(self, path) -> Path:
        """Write the converted model (``.mlpackage`` for Core ML, ``.aimodel`` for Core AI); a chunked
        model is written as a folder of packages with ``manifest.json``."""
        if self.chunks is not None:
            return self.chunks.save(path)
        if self.artifact is None:
            raise AttributeError("compiled with convert=False: there is nothing to save")
        return self.artifact.save(path)

    def with_compression(self, compression, progress=None) -> CompiledModel:
        """This compile with ``compression`` applied to its converted fp16 program (no new capture or
        conversion): how the benchmark compares schemes side by side."""
        import dataclasses

        from anefx.targets.compression import check_deployment_target, compress_artifact, resolve

        comp = resolve(compression)
        if self.artifact is None or self.chunks is not None:
            raise AnefxError("with_compression needs one converted program (compile with convert=True, unchunked)")
        base = self.artifact if self.compression is None else dataclasses.replace(self.artifact)
        if self.compression is not None:
            base.model = self.compression.fp16_model
        deployment = self.artifact.model.get_spec().specificationVersion
        check_deployment_target(comp, self.target, "iOS18" if deployment >= 9 else "iOS17")
        artifact, done = compress_artifact(base, comp, self.captured.flat_inputs, progress)
        return dataclasses.replace(self, artifact=artifact, compression=done)

    def lm_quality(
        self,
        prompts,
        new_tokens: int = 64,
        *,
        sequences=None,
        ids_input: str = "input_ids",
        pad_id: int = 0,
    ):
        """Greedy-token agreement and mean KL of the compressed weights against the fp16 package for a
        causal LM compiled with a full-sequence forward (``config.use_cache=False``): each prompt is
        continued greedily by the fp16 model (or ``sequences``: prompt + continuation, given), then both
        score every continuation token teacher forced. Other inputs keep their example values (e.g.
        an all-ones attention mask)."""
        from anefx.targets.quality import greedy_continuations, lm_agreement, padded_logits_fn

        if self.compression is None:
            raise AttributeError("compiled without compression=: there is nothing to compare")
        names = list(self.captured.input_names)
        if ids_input not in names:
            raise ValueError(f"no input named {ids_input!r}; the inputs are {names}")
        at = names.index(ids_input)
        flat = list(self.captured.flat_inputs)
        length = flat[at].shape[-1]

        def runner(variant):
            over = self.compression.overrides(variant)

            def run(ids):
                inputs = [ids if i == at else t for i, t in enumerate(flat)]
                return self.compression.swap.swap(inputs, over)[0][0]

            return padded_logits_fn(run, length, pad_id)

        ref, cand = runner("fp16"), runner("compressed")
        if sequences is None:
            sequences = greedy_continuations(ref, prompts, new_tokens)
        lm = lm_agreement(ref, cand, sequences, [p.shape[-1] for p in prompts])
        self.compression.quality.lm = lm
        return lm

    def max_error(self, *args, **kwargs) -> float:
        """Largest absolute difference between the rewritten graph and the captured model."""
        from anefx.ir.capture import flatten_inputs

        args, kwargs = self.captured.constants.strip(args, kwargs)
        flat = flatten_inputs(args, kwargs) if (args or kwargs) else self.captured.flat_inputs
        ref = run_flat(self.captured.graph_module, flat)
        out = run_flat(self.graph_module, flat)
        return max((float((a.double() - b.double()).abs().max()) for a, b in zip(out, ref, strict=True)), default=0.0)


def _converter_input_errors(checks: dict) -> dict:
    """The error of the graph actually handed to the converter, for the report's summary line."""
    found = checks.get("converter_input")
    if not isinstance(found, dict):
        return {"converter_input": found} if found else {}
    return {
        "converter_input_max_abs_error": f"{found['max_abs_error']:.2e}",
        "converter_input_max_rel_error": f"{found['max_rel_error']:.2e}",
    }


def compile(  # noqa: A001 - the public name users expect
    model,
    example_inputs=(),
    example_kwargs: Mapping | None = None,
    *,
    pipeline: Pipeline | None = None,
    target: str = "coreml",
    target_options: Any = None,
    convert: bool = True,
    compression: Any = None,
    max_chunk_mb: float | None = None,
    lm_head: Any = None,
    validate: str | None = None,
    validation: ValidationOptions | None = None,
    never_worse: bool = True,
    debug: DebugOptions | None = None,
    progress: Callable[[str], None] | None = None,
    **debug_overrides,
) -> CompiledModel:
    """Compile ``model`` for the Apple Neural Engine.

    Args:
        model: an ``nn.Module`` (or ``symbolic_trace`` GraphModule, or ``ExportedProgram``).
        example_inputs: a tuple of positional example inputs; ``example_kwargs`` the keyword ones.
        pipeline: the passes to run (default :meth:`Pipeline.default`).
        target: ``"coreml"`` (``.mlpackage``) or ``"coreai"`` (``.aimodel``).
        target_options: the target's options dataclass (e.g. ``CoreMLOptions``); checked before any
            work starts.
        convert: False stops after the passes (no hand-off).
        compression: ``"lut4" | "lut6" | "lut8" | "int8"`` or a ``CompressionOptions``: compress the
            converted program's weights (Core ML) and measure the shipped weights against the fp16
            package in PyTorch (``compiled.compression.quality``). Refused schemes and deployment
            targets that cannot hold the scheme fail here, before capture.
        lm_head: ``LMHeadOptions``: split projections to the vocabulary into convs of at most
            ``max_channels`` output channels (default without options: only above 65,536, the hard
            ANE limit) and optionally return ``argmax`` / ``topk`` instead of the logits (package only;
            the torch graph keeps its logits).
        max_chunk_mb: split the model at layer boundaries into packages of at most this many MB
            (``compiled.chunks``; ``save`` writes them and a manifest).
        validate: ``off``, ``lint`` or ``numeric``.
        validation: :class:`ValidationOptions` (tolerances, random inputs …).
        never_worse: after the passes, compare the layout changes (transposes + reshapes) of the
            rewritten graph with the captured one's, region by region, and run the pipeline again
            with the regions that came out worse kept in their original form
            (:mod:`anefx.driver.guard`; ``report.guard`` names them). False ships the passes'
            result as it is (to study a pass's own output); a ``bisect_limit`` turns it off too.
        debug: :class:`DebugOptions`. Keyword overrides of its fields (``print_ir_after_all=True``,
            ``dump_dir=...``, ``bisect_limit=3`` …) may be passed to ``compile`` directly.

    Explicit arguments beat environment variables: ``ANEFX_VALIDATE`` applies only when neither
    ``validate`` nor ``validation`` is given, the ``ANEFX_*`` debug variables only when ``debug`` is
    not given (keyword overrides apply on top of either).
    """
    unknown = sorted(set(debug_overrides) - {f.name for f in dataclasses.fields(DebugOptions)})
    if unknown:
        raise TypeError(
            f"compile() got unexpected keyword argument(s) {unknown}; besides its own parameters it takes "
            f"the DebugOptions fields {[f.name for f in dataclasses.fields(DebugOptions)]}"
        )
    comp, target_options, cap = _check_deploy_options(model, compression, max_chunk_mb, target, target_options, convert)
    tgt = target_by_name(target, target_options) if convert else None  # bad options fail now, before long work
    timings: dict[str, float] = {}
    start = t0 = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs)
    timings["capture"] = time.perf_counter() - t0

    pipeline = pipeline if pipeline is not None else Pipeline.default()
    if validation is not None:
        pipeline = pipeline.with_validation(validation)
    if validate is not None:
        mode = validate
    elif validation is not None:
        mode = validation.mode
    else:
        mode = validate_mode_from_env(pipeline.validation.mode)
    pipeline = pipeline.with_validation(mode=mode)
    debug = (debug or DebugOptions.from_env()).merged(**debug_overrides)

    t0 = time.perf_counter()

    def run(refused=None, pipeline=pipeline):
        if refused and progress:
            progress(f"guard: re-run without {sum(map(len, refused.values()))} site(s)")
        return pipeline.run(
            captured.graph_module,
            captured.flat_inputs,
            reference_outputs=captured.reference_outputs,
            debug=debug,
            progress=progress,
            precision=getattr(target_options, "precision_name", "float16"),
            refused=refused,
        )

    result = unguarded = run()
    guard_info: dict = {}
    if never_worse and pipeline.passes and debug.bisect_limit is None:  # bisecting: the passes as they ran
        outcome = guard(captured.graph_module, result, run, stock_form=lambda: run(pipeline=stock_pipeline(pipeline)))
        result, guard_info = outcome.result, outcome.info
        timings["passes.guard"] = guard_info["seconds"]
    timings["passes"] = time.perf_counter() - t0
    report = Report(result.records, guard=guard_info)
    timings["passes.validation"] = sum(r.validation_seconds for r in result.records)

    def handoff_of(result) -> HandOff:
        handoff = HandOff(
            graph_module=result.graph_module,
            example_args=captured.example_args,
            example_kwargs=captured.example_kwargs,
            input_names=captured.input_names,
            output_names=captured.output_names,
            validator=result.validator,
        )
        if not convert:
            return handoff
        from anefx.targets.lm_head import split_handoff

        handoff, head_stats = split_handoff(handoff, captured.flat_inputs, lm_head)
        if head_stats is not None:
            report.conversion["lm_head"] = head_stats
        return handoff

    artifact = chunked = None
    handoff = handoff_of(result)
    if convert and cap is not None:
        from anefx.targets.chunking import convert_chunked

        chunked = convert_chunked(handoff, captured.flat_inputs, tgt, comp, cap, progress, timings)
        report.conversion |= {"target": target, "chunks": len(chunked.chunks), "max_chunk_mb": cap}
        convert = False
    if convert:
        if progress:
            progress(f"convert:{target}")
        t0 = time.perf_counter()
        try:
            artifact = tgt.convert(handoff)
        except ConversionError as exc:
            if result is unguarded:
                raise
            # the regions kept in their original form do not convert (e.g. an LSTM's outputs read
            # directly by a linear, which coremltools rejects as the stock model): the passes'
            # output did get further, and a model that converts beats one with fewer copies
            result = unguarded
            report.records = result.records
            why = str(exc).split(". ")[0]
            report.guard["fallback"] = f"the kept form does not convert ({why}): shipped the passes' output"
            handoff = handoff_of(result)
            artifact = tgt.convert(handoff)
        timings["convert"] = time.perf_counter() - t0
        for stage, seconds in artifact.info.get("timings", {}).items():
            timings[f"convert.{stage}"] = seconds
        report.conversion |= {
            "target": target,
            "seconds": round(timings["convert"], 3),
            **_converter_input_errors(handoff.checks),
            "ops": dict(sorted(artifact.op_histogram().items())),
            "checks": handoff.checks,
        }
    compressed = None
    if comp is not None and artifact is not None:
        from anefx.targets.compression import compress_artifact

        t0 = time.perf_counter()
        artifact, compressed = compress_artifact(artifact, comp, captured.flat_inputs, progress)
        timings["compress"] = time.perf_counter() - t0
        report.conversion["compression"] = compressed.quality.summary()
    timings["total"] = time.perf_counter() - start
    report.timings = dict(timings)
    return CompiledModel(
        graph_module=result.graph_module,
        report=report,
        captured=captured,
        artifact=artifact,
        target=target,
        timings=timings,
        compression=compressed,
        chunks=chunked,
    )


def _check_deploy_options(model, compression, max_chunk_mb, target: str, target_options, convert: bool):
    """Resolve ``compression=`` and ``max_chunk_mb=`` and refuse what cannot work, before any long
    work starts. Without ``target_options`` a scheme that needs iOS18 gets
    ``minimum_deployment_target="iOS18"``; an explicit earlier target is refused with the reason.
    Returns ``(compression options, target options, chunk cap in MB or None)``."""
    from anefx.targets.chunking import check_cap, default_cap_mb
    from anefx.targets.compression import bytes_per_weight, check_deployment_target, needs_ios18, resolve

    comp = resolve(compression)
    cap = None
    params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    if convert and target == "coreml":
        per_weight = bytes_per_weight(comp)
        if max_chunk_mb is not None:
            cap = float(max_chunk_mb)
            check_cap(params, cap, per_weight)
        else:  # chunk only models above the target's default cap
            deployment = target_options.target_name if target_options is not None else "iOS16"
            total = sum(p.numel() for p in {id(p): p for _, p in params}.values()) * per_weight
            if total > default_cap_mb(deployment) * 1e6:
                cap = default_cap_mb(deployment)
                check_cap(params, cap, per_weight)
    elif max_chunk_mb is not None:
        raise AnefxError(f"max_chunk_mb is implemented for the Core ML target with convert=True (target={target!r})")
    if comp is None:
        return None, target_options, cap
    if not convert:
        raise AnefxError("compression= compresses the converted program: it needs convert=True")
    if target == "coreml":
        from anefx.targets.coreml import CoreMLOptions

        if target_options is None:
            target_options = CoreMLOptions(minimum_deployment_target="iOS18" if needs_ios18(comp) else "iOS16")
        check_deployment_target(comp, target, target_options.target_name)
    else:
        check_deployment_target(comp, target, "")
    return comp, target_options, cap
