"""What every front end's result shares: the build, and everything done to its artifact.

``CompiledModel`` (``compile``) and ``CompiledLM`` (``compile_lm``) both extend :class:`Compiled`:
saving, op histograms, the ANE report, compression and its quality work the same way whichever
front end made the artifact; a front end adds only what is its own (calling the rewritten graph,
generating text).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from anefx.ane.report import ANEReport, add_unmatched_attention, analyse
from anefx.ane.traffic import Traffic, estimate_traffic
from anefx.core.stages import Build, BuiltFunction
from anefx.driver.events import Events
from anefx.driver.report import Report
from anefx.ir.errors import AnefxError
from anefx.targets.artifact import Artifact
from anefx.targets.compression import Compression, resolve

#: the weight bytes above which the end-to-end check of a chain loads one chunk at a time
#: (:meth:`Compiled._checked_view`): Whisper-large-v3's 3.1 GB chain is, a test's chain of a few MB is not
ONE_PART_AT_A_TIME_ABOVE_BYTES = 1_000_000_000


@dataclass
class Compiled:
    """A compile's build (per function its capture, graphs and report; the artifact; the events)."""

    build: Build = field(repr=False)

    # -- what was built ----------------------------------------------------------------------
    @property
    def artifact(self) -> Artifact:
        """The artifact: one package, or a chain of chunks (see :attr:`chunks`)."""
        return self.build.artifact

    @property
    def target(self) -> str:
        return self.build.plan.target.name

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage (``capture``, ``passes``, ``passes.guard``, ``convert``,
        ``convert.ct_convert`` …, ``total``), from the compile's events."""
        return self.build.timings

    @property
    def events(self) -> Events:
        return self.build.events

    @property
    def compression(self) -> Compression | None:
        """The weight compression (``compression=``): plan and measured quality per package and function."""
        return self.build.artifact.compression

    @property
    def chunks(self) -> Artifact | None:
        """The chain of packages when the model was split (``max_chunk_mb=``), else None."""
        return self.build.artifact if self.build.artifact.chunked else None

    def _built(self, function: str | None) -> BuiltFunction:
        name = function or self.build.artifact.default
        if name not in self.build.functions:
            raise KeyError(f"no function {name!r}; this compile has {list(self.build.functions)}")
        return self.build.functions[name]

    # -- the artifact ------------------------------------------------------------------------
    def _converted(self) -> Artifact:
        if not self.build.artifact.converted:
            raise AttributeError("compiled with convert=False: there is no converted program")
        return self.build.artifact

    def op_histogram(self, function: str | None = None) -> collections.Counter:
        """Op types of one function of the converted program (summed over the chain)."""
        self._built(function)
        return self._converted().op_histogram(function)

    def traffic(self, function: str | None = None) -> Traffic:
        """The memory traffic ESTIMATE of one call of ``function`` (default: the artifact's default,
        ``decode`` for generation; :mod:`anefx.ane.traffic`: bytes each MIL op reads and writes,
        weights once, states updated in place), over every package of a chain that holds it."""
        built = self._built(function)
        total = Traffic(built.name)
        for program in self._converted().holding(built.name):
            part = estimate_traffic(program.package.operations(built.name), built.name)
            total.ops += part.ops
            total.states.update(part.states)
        return total

    def save(self, path) -> Path:
        """Write the package atomically (``.mlpackage`` for Core ML, ``.aimodel`` for Core AI); a
        chain is written as a folder of packages with ``manifest.json``."""
        if not self.build.artifact.converted:
            raise AttributeError("compiled with convert=False: there is nothing to save")
        return self.build.artifact.save(path)

    def analyse(self, function: str | None = None) -> ANEReport:
        """The ANE readiness report (rules, fp16 range, roofline ESTIMATE per chip) of one function,
        over every package of the chain; computed on first use."""
        built = self._built(function)
        cache = self.__dict__.setdefault("_ane_reports", {})
        if built.name not in cache:
            artifact = self.build.artifact
            if not artifact.converted or artifact.target.capabilities.program != "mil":
                raise ValueError(
                    "the ANE report reads a converted Core ML program: compile with target='coreml', convert=True"
                )
            report = analyse(artifact, built.name, built.graph_module, built.captured.flat_inputs)
            add_unmatched_attention(report, built.report.records)
            cache[built.name] = report
        return cache[built.name]

    def _with_artifact(self, artifact: Artifact):
        new = dataclasses.replace(self, build=dataclasses.replace(self.build, artifact=artifact))
        new.__dict__.pop("_ane_reports", None)
        return new

    def _checked_view(self, runtime: str, one_part_at_a_time: bool | None = None):
        """What a front end's end-to-end check runs with ``runtime``: this compile (``"torch"``), or
        its fp16 packages with their executor. A chain whose weights pass
        :data:`ONE_PART_AT_A_TIME_ABOVE_BYTES` (or with ``one_part_at_a_time``) is loaded one chunk
        at a time, each for its call and released after it: the packages of a chain are what is
        split to fit, and the compile still holds everything else when the check runs; a smaller
        chain is loaded once (a load per chunk per call costs more than its memory)."""
        if runtime == "torch":
            return self
        view = self._with_artifact(self.artifact.fp16())
        if one_part_at_a_time is None:
            one_part_at_a_time = view.artifact.chunked and view.artifact.weight_bytes() > ONE_PART_AT_A_TIME_ABOVE_BYTES
        executor = view.artifact.executor(
            None if runtime == "target" else runtime, one_part_at_a_time=one_part_at_a_time
        )
        view.__dict__["_executors"] = {runtime: executor}
        return view

    def _compressed(self, compression, progress=None) -> Artifact:
        """The artifact with ``compression`` applied to its converted fp16 programs (no new capture
        or conversion)."""
        comp = resolve(compression)
        if comp is None:
            raise AnefxError("with_compression needs a scheme ('lut4', 'lut6', 'lut8', 'int8' or CompressionOptions)")
        artifact = self._converted()
        target = artifact.target.for_compression(comp, explicit_options=True)
        return dataclasses.replace(artifact, target=target).compressed(comp, Events(progress))


@dataclass
class CompiledSteps(Compiled):
    """A compile of several step functions sharing weights and states (``compile_lm``: a causal LM's
    ``prefill``/``decode``, an encoder-decoder's ``encode``/``prefill``/``decode``), each with its own
    graph, report and examples."""

    @property
    def graphs(self) -> dict[str, torch.fx.GraphModule]:
        """Each function's rewritten step graph (pure: the states are inputs and outputs)."""
        return {fn: b.graph_module for fn, b in self.build.functions.items()}

    @property
    def reports(self) -> dict[str, Report]:
        return {fn: b.report for fn, b in self.build.functions.items()}

    @property
    def examples(self) -> dict[str, list]:
        """Each function's flat example inputs (ids, positions, states)."""
        return {fn: b.captured.flat_inputs for fn, b in self.build.functions.items()}

    @property
    def package(self):
        """The single package (None when chunked or compiled with convert=False)."""
        artifact = self.artifact
        return artifact.package if artifact.converted and not artifact.chunked else None

    @property
    def metadata(self) -> dict[str, str]:
        return self.artifact.metadata
