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

from anefx.ane.report import analyse
from anefx.capture import Captured, capture
from anefx.debug import DebugOptions, validate_mode_from_env
from anefx.pipeline import Pipeline
from anefx.report import Report
from anefx.targets.base import Artifact, HandOff
from anefx.targets.registry import target_by_name
from anefx.validate import ValidationOptions, run_flat


@dataclass
class CompiledModel:
    """The result of :func:`anefx.compile`.

    ``graph_module`` is the rewritten graph; it runs in PyTorch with the model's inputs and returns
    the model's output structure. ``artifact`` is the target's converted model (``mlmodel`` for Core
    ML). ``report`` holds one record per pass.
    """

    graph_module: torch.fx.GraphModule
    report: Report
    captured: Captured
    artifact: Artifact | None = None
    target: str = "coreml"
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
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
            if self.target != "coreml" or self.artifact is None:
                raise ValueError("the ANE report reads a Core ML program: compile with target='coreml', convert=True")
            self.__dict__["_ane_report"] = analyse(self.artifact, self.graph_module, self.captured.flat_inputs)
        return self.__dict__["_ane_report"]

    def op_histogram(self):
        if self.artifact is None:
            raise AttributeError("compiled with convert=False: there is no converted program to inspect")
        return self.artifact.op_histogram()

    def save(self, path) -> Path:
        """Write the converted model (``.mlpackage`` for Core ML, ``.aimodel`` for Core AI)."""
        if self.artifact is None:
            raise AttributeError("compiled with convert=False: there is nothing to save")
        return self.artifact.save(path)

    def max_error(self, *args, **kwargs) -> float:
        """Largest absolute difference between the rewritten graph and the captured model."""
        from anefx.capture import flatten_inputs

        flat = flatten_inputs(args, kwargs) if (args or kwargs) else self.captured.flat_inputs
        ref = run_flat(self.captured.graph_module, flat)
        out = run_flat(self.graph_module, flat)
        return max((float((a.double() - b.double()).abs().max()) for a, b in zip(out, ref, strict=True)), default=0.0)


def compile(  # noqa: A001 - the public name users expect
    model,
    example_inputs=(),
    example_kwargs: Mapping | None = None,
    *,
    pipeline: Pipeline | None = None,
    target: str = "coreml",
    target_options: Any = None,
    convert: bool = True,
    validate: str | None = None,
    validation: ValidationOptions | None = None,
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
        validate: ``off``, ``lint`` or ``numeric``.
        validation: :class:`ValidationOptions` (tolerances, random inputs …).
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
    tgt = target_by_name(target, target_options) if convert else None  # bad target options fail now
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
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
    result = pipeline.run(
        captured.graph_module,
        captured.flat_inputs,
        reference_outputs=captured.reference_outputs,
        debug=debug,
        progress=progress,
    )
    timings["passes"] = time.perf_counter() - t0
    report = Report(result.records)

    artifact = None
    if convert:
        if progress:
            progress(f"convert:{target}")
        t0 = time.perf_counter()
        artifact = tgt.convert(
            HandOff(
                graph_module=result.graph_module,
                example_args=captured.example_args,
                example_kwargs=captured.example_kwargs,
                input_names=captured.input_names,
                output_names=captured.output_names,
            )
        )
        timings["convert"] = time.perf_counter() - t0
        report.conversion = {
            "target": target,
            "seconds": round(timings["convert"], 3),
            "ops": dict(sorted(artifact.op_histogram().items())),
        }
    return CompiledModel(
        graph_module=result.graph_module,
        report=report,
        captured=captured,
        artifact=artifact,
        target=target,
        timings=timings,
    )
