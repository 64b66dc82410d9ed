"""``anefx.compile``: the front end for one function (``main``) of a model called as it is.

It asks the stages (:mod:`anefx.core.stages`) for one function captured from ``model(*example_inputs,
**example_kwargs)``; capture, pipeline, guard, validated hand-off, conversion, compression and
chunking are the stages' work, the same as for every front end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.fx

from anefx.core.options import CompileOptions, compile_options, prepare
from anefx.core.result import Compiled
from anefx.core.stages import FunctionSpec, ProgramRequest, build
from anefx.driver.debug import DebugOptions
from anefx.driver.events import Event, Events
from anefx.driver.pipeline import Pipeline
from anefx.driver.report import Report
from anefx.driver.validate import ValidationOptions, run_flat
from anefx.ir.capture import Captured, flatten_inputs
from anefx.targets.compression import CompressionOptions
from anefx.targets.lm_head import LMHeadOptions
from anefx.targets.quality import LMQuality, lm_quality, padded_logits_fn
from anefx.targets.verify import ArtifactCheckOptions

FUNCTION = "main"


class CompiledModel(Compiled):
    """The result of :func:`anefx.compile`.

    ``graph_module`` is the rewritten graph; it runs in PyTorch with the model's inputs and returns
    the model's output structure. ``artifact`` is what ships (:class:`~anefx.targets.artifact.Artifact`:
    one package, or a chain of chunks). ``report`` holds one record per pass and the hand-off's
    summary. ``timings`` holds the seconds of every stage (see :attr:`Compiled.timings`).
    """

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.build.functions[FUNCTION].graph_module

    @property
    def report(self) -> Report:
        return self.build.functions[FUNCTION].report

    @property
    def captured(self) -> Captured:
        return self.build.functions[FUNCTION].captured

    def __call__(self, *args, **kwargs):
        """Run the rewritten graph. Inputs specialised at capture (``use_cache=False`` …) may be
        given again with the same value or left out; a different value raises ``CaptureError``."""
        args, kwargs = self.captured.constants.strip(args, kwargs)
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    @property
    def mlmodel(self):
        """The coremltools ``MLModel`` (Core ML target, one package)."""
        if self.artifact.target.capabilities.program != "mil" or not self.artifact.converted or self.artifact.chunked:
            raise AttributeError(
                f"no single Core ML model: this was compiled for target={self.target!r}, "
                f"convert={self.artifact.converted}, chunked={self.artifact.chunked}"
            )
        return self.artifact.package.model

    @property
    def ane_report(self):
        """The ANE readiness report (:func:`anefx.check`) of this compile; computed on first use."""
        return self.analyse(FUNCTION)

    def with_compression(self, compression, progress: Callable[[Event], None] | None = None) -> CompiledModel:
        """This compile with ``compression`` applied to its converted fp16 program (no new capture or
        conversion): how the benchmark compares schemes side by side."""
        return self._with_artifact(self._compressed(compression, progress))

    def lm_quality(
        self,
        prompts,
        new_tokens: int = 64,
        *,
        sequences=None,
        ids_input: str = "input_ids",
        pad_id: int = 0,
    ) -> LMQuality:
        """Greedy-token agreement and mean KL of the compressed weights against the fp16 package for a
        causal LM compiled with a full-sequence forward (``config.use_cache=False``): each prompt is
        continued greedily by the fp16 model (or ``sequences``: prompt + continuation, given), then both
        score every continuation token teacher forced. Other inputs keep their example values (e.g.
        an all-ones attention mask)."""
        if self.compression is None:
            raise AttributeError("compiled without compression=: there is nothing to compare")
        names = self.artifact.inputs[FUNCTION]
        if ids_input not in names:
            raise ValueError(f"no input named {ids_input!r}; the inputs are {names}")
        examples = dict(zip(names, self.artifact.programs[0].functions[FUNCTION].value_examples(), strict=True))
        length = examples[ids_input].shape[-1]

        def logits(variant: str):
            def run(ids):
                return self.artifact.run({**examples, ids_input: ids}, variant=variant)[0]

            return padded_logits_fn(run, length, pad_id)

        return self.compression.set_lm(lm_quality(logits, prompts, new_tokens, sequences))

    def max_error(self, *args, **kwargs) -> float:
        """Largest absolute difference between the rewritten graph and the captured model."""
        args, kwargs = self.captured.constants.strip(args, kwargs)
        flat = flatten_inputs(args, kwargs) if (args or kwargs) else self.captured.flat_inputs
        ref = run_flat(self.captured.graph_module, flat)
        out = run_flat(self.graph_module, flat)
        return max((float((a.double() - b.double()).abs().max()) for a, b in zip(out, ref, strict=True)), default=0.0)


def compile(  # noqa: A001 - the public name users expect
    model,
    example_inputs=(),
    example_kwargs: Mapping | None = None,
    *,
    options: CompileOptions | None = None,
    pipeline: Pipeline | None = None,
    target: str | None = None,
    target_options=None,
    convert: bool | None = None,
    compression: str | CompressionOptions | None = None,
    max_chunk_mb: float | None = None,
    lm_head: LMHeadOptions | None = None,
    validate: str | None = None,
    validation: ValidationOptions | None = None,
    never_worse: bool | None = None,
    artifact_check: ArtifactCheckOptions | str | None = None,
    debug: DebugOptions | None = None,
    progress: Callable[[Event], None] | None = None,
    **debug_overrides,
) -> CompiledModel:
    """Compile ``model`` for the Apple Neural Engine.

    Args:
        model: an ``nn.Module`` (or ``symbolic_trace`` GraphModule, or ``ExportedProgram``).
        example_inputs: a tuple of positional example inputs; ``example_kwargs`` the keyword ones.
        options: :class:`~anefx.core.options.CompileOptions`, shared with ``compile_lm``; each keyword
            argument below that is given overrides its field.
        pipeline: the passes to run (default :meth:`Pipeline.default`).
        target: ``"coreml"`` (``.mlpackage``, the default) or ``"coreai"`` (``.aimodel``).
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
        artifact_check: execute the converted program (the bytes ``save`` writes) on the example,
            random and stress input sets and compare it with the model: ``"all"`` (default, or
            ``ANEFX_ARTIFACT_CHECK``), ``"example"``, ``"off"``, or an :class:`ArtifactCheckOptions`
            (tolerances). ``report.artifact`` gives each output's max abs error and error relative to
            its scale; a program that differs is located (MIL op, torch node, source line), an fp16
            one converted again with the located region in fp32, and one that still differs raises
            :class:`~anefx.targets.verify.ArtifactError`: nothing wrong ships.
        debug: :class:`DebugOptions`. Keyword overrides of its fields (``print_ir_after_all=True``,
            ``dump_dir=...``, ``bisect_limit=3`` …) may be passed to ``compile`` directly.
        progress: a listener of the compile's :class:`~anefx.driver.events.Event` s (stages
            started and ended, one step per pass).

    Explicit arguments beat the options object, which beats environment variables: ``ANEFX_VALIDATE``
    applies only when neither ``validate`` nor ``validation`` is given, the ``ANEFX_*`` debug
    variables only when ``debug`` is not given (keyword overrides apply on top of either).
    """
    opts = compile_options(
        options,
        "compile",
        pipeline=pipeline,
        target=target,
        target_options=target_options,
        convert=convert,
        compression=compression,
        max_chunk_mb=max_chunk_mb,
        lm_head=lm_head,
        validate=validate,
        validation=validation,
        never_worse=never_worse,
        artifact_check=artifact_check,
        debug=debug,
        **debug_overrides,
    )
    params = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
    plan = prepare(opts, params)
    events = Events(progress)
    request = ProgramRequest([FunctionSpec(FUNCTION, model, example_inputs, example_kwargs)])
    return CompiledModel(build(request, plan, events))
