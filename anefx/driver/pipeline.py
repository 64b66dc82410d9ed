"""The pass pipeline: an immutable list of passes, run with validation and rollback after each.

``Pipeline.default().without("fold_transposes").with_options("linear_to_conv", min_channels=64)``
builds a new pipeline each time (presets return copies; nothing is shared or global).
``Pipeline.run`` applies each pass to a clone of the graph (sharing the weights), refreshes shape
metadata, validates, and keeps the result only if it validates. A failing pass that declares rewrite
sites (``ctx.site(anchor)``, see :mod:`anefx.ir.sites`) is re-run on halves of its sites until the
failing sites are found (a binary search: about ``2·log2(n)`` re-runs for one bad site of ``n``);
the pass is kept without them and the report names each excluded site with its op, source line and
error. A pass without sites, or whose remaining sites still fail together, is rolled back whole,
recorded with its error, and the pipeline goes on. :func:`apply_validated` is that mechanism for
any transformation (the targets' legalization uses it too); it lives in :mod:`anefx.driver.validate`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.ranges import value_ranges
from anefx.driver.debug import DebugOptions
from anefx.driver.events import Events
from anefx.driver.instruments import Instruments
from anefx.driver.report import PassRecord
from anefx.driver.validate import ValidationOptions, Validator, apply_validated
from anefx.ir.errors import PipelineOrderError
from anefx.ir.sites import Site
from anefx.passes.base import Pass, PassContext


@dataclass
class PipelineResult:
    graph_module: torch.fx.GraphModule
    records: list[PassRecord]
    #: the input sets and reference outputs every pass was checked against (for the hand-off)
    validator: Validator | None = None
    #: per pass name, every rewrite site it declared (refused ones included), in order
    sites: dict[str, list[Site]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...] = ()
    validation: ValidationOptions = field(default_factory=ValidationOptions)

    def __post_init__(self) -> None:
        """Refuse an order that breaks a pass's declared ``runs_after``."""
        position = {p.name: i for i, p in enumerate(self.passes)}
        for i, p in enumerate(self.passes):
            late = sorted(n for n in p.runs_after if position.get(n, -1) > i)
            if late:
                raise PipelineOrderError(
                    f"pass {p.name!r} (position {i}) must run after {late}, which come later in this pipeline: "
                    f"{self.names}. Move {p.name!r} after them (insert_after), or remove them (without)"
                )

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def default(cls) -> Pipeline:
        from anefx.passes import default_passes

        return cls(tuple(default_passes()))

    @classmethod
    def empty(cls) -> Pipeline:
        return cls(())

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Pipeline:
        from anefx.passes import pass_by_name

        return cls(tuple(pass_by_name(n) for n in names))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _index(self, name: str) -> int:
        for i, p in enumerate(self.passes):
            if p.name == name:
                return i
        raise KeyError(f"no pass named {name!r} in this pipeline; it has: {self.names}")

    def without(self, *names: str) -> Pipeline:
        for n in names:
            self._index(n)
        return Pipeline(tuple(p for p in self.passes if p.name not in names), self.validation)

    def with_options(self, name: str, options=None, **overrides) -> Pipeline:
        i = self._index(name)
        old = self.passes[i]
        new = type(old)(options if options is not None else old.options, **overrides)
        return Pipeline((*self.passes[:i], new, *self.passes[i + 1 :]), self.validation)

    def append(self, *passes: Pass) -> Pipeline:
        return Pipeline(self.passes + tuple(passes), self.validation)

    def insert_before(self, name: str, *passes: Pass) -> Pipeline:
        i = self._index(name)
        return Pipeline(self.passes[:i] + tuple(passes) + self.passes[i:], self.validation)

    def insert_after(self, name: str, *passes: Pass) -> Pipeline:
        i = self._index(name) + 1
        return Pipeline(self.passes[:i] + tuple(passes) + self.passes[i:], self.validation)

    def with_validation(self, options: ValidationOptions | None = None, **overrides) -> Pipeline:
        import dataclasses

        base = options or self.validation
        return Pipeline(self.passes, dataclasses.replace(base, **overrides) if overrides else base)

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        gm: torch.fx.GraphModule,
        flat_inputs: Sequence,
        *,
        reference_outputs: Sequence | None = None,
        debug: DebugOptions | None = None,
        events: Events | None = None,
        precision: str = "float16",
        refused: Mapping[str, Collection[str]] | None = None,
    ) -> PipelineResult:
        """Run every pass on (a clone of) ``gm``; the input graph is never modified. ``precision`` is
        the target's compute precision (``PassContext.precision``). ``refused`` maps a pass name to
        sites (anchor node names) it must not rewrite: how the never-worse guard keeps a region in
        its original form (:mod:`anefx.driver.guard`). ``events`` gets one step per pass (progress)."""
        refused = refused or {}
        debug = debug or DebugOptions()
        instruments = Instruments(debug, self.passes, flat_inputs)
        validator = Validator(gm, flat_inputs, self.validation, reference_outputs)
        current = gm
        records: list[PassRecord] = []
        sites: dict[str, list[Site]] = {}
        instruments.start(current)
        measured: tuple = (None, None)  # (graph, its value ranges)
        for index, p in enumerate(self.passes):
            record = PassRecord(index=index, name=p.name)
            records.append(record)
            if events is not None:
                events.step(p.name, index=index, of=len(self.passes))
            if debug.bisect_limit is not None and debug.bisect_limit >= 0 and index >= debug.bisect_limit:
                record.skipped = f"bisect limit {debug.bisect_limit}"
                instruments.bisect_line(index, p.name, ran=False)
                continue
            instruments.bisect_line(index, p.name, ran=True)
            instruments.before(index, p, current)

            ranges = None
            if p.needs_ranges and precision == "float16":
                if measured[0] is not current:  # consecutive passes on an unchanged graph share them
                    measured = (current, value_ranges(current, validator.input_sets))
                ranges = measured[1]

            def transform(work, selection, p=p, ranges=ranges):
                ctx = PassContext(flat_inputs=list(flat_inputs), sites=selection, precision=precision, ranges=ranges)
                result = p.run(work, ctx)
                return result.graph_module, bool(result.modified), dict(getattr(result, "stats", {}) or {})

            applied = apply_validated(
                transform, current, flat_inputs, validator, refused=frozenset(refused.get(p.name, ()))
            )
            sites.setdefault(p.name, []).extend(applied.sites)
            record.modified = applied.modified
            record.stats = applied.stats
            record.seconds = applied.seconds
            record.validation_seconds = applied.validation_seconds
            record.max_abs_error = applied.verdict.max_abs_error
            record.max_rel_error = applied.verdict.max_rel_error
            if applied.sites:
                record.sites = len(applied.sites)
            record.excluded_sites = [
                {"site": s.name, "op": s.op, "where": s.where, "error": e} for s, e in applied.excluded
            ]
            if applied.graph_module is None:
                record.rolled_back = True
                record.error = applied.verdict.message
                instruments.failed(index, p, current, record, None)
                continue
            if not record.modified:
                instruments.after(index, p, current, current, record)
                continue
            instruments.after(index, p, current, applied.graph_module, record)
            current = applied.graph_module
        instruments.finish(current, records)
        if self.validation.mode == "example" and current is not gm:
            # the passes were checked on the example set: the final graph is checked on every set,
            # and when it fails there the pipeline runs again checking each pass on every set
            # (which rolls back the pass, or the sites, that broke it)
            if events is not None:
                events.step("validate every set")
            verdict = validator.check(current, every_set=True)
            if not verdict.ok:
                if events is not None:
                    events.step("rerun numeric", error=verdict.message)
                again = self.with_validation(mode="numeric")
                return again.run(
                    gm,
                    flat_inputs,
                    reference_outputs=reference_outputs,
                    debug=debug,
                    events=events,
                    precision=precision,
                    refused=refused,
                )
        return PipelineResult(current, records, validator, sites)
