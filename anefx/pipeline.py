"""The pass pipeline: an immutable list of passes, run with validation and rollback after each.

``Pipeline.default().without("fold_transposes").with_options("linear_to_conv", min_channels=64)``
builds a new pipeline each time (presets return copies; nothing is shared or global).
``Pipeline.run`` applies each pass to a clone of the graph (sharing the weights), refreshes shape
metadata, validates, and keeps the result only if it validates. A failing pass that declares rewrite
sites (``ctx.site(anchor)``, see :mod:`anefx.sites`) is re-run on halves of its sites until the
failing sites are found (a binary search: about ``2·log2(n)`` re-runs for one bad site of ``n``);
the pass is kept without them and the report names each excluded site with its op, source line and
error. A pass without sites, or whose remaining sites still fail together, is rolled back whole,
recorded with its error, and the pipeline goes on. :func:`apply_validated` is that mechanism for
any transformation (the targets' legalization uses it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.debug import DebugOptions
from anefx.graph import clone_graph_module, refresh_meta
from anefx.instruments import Instruments
from anefx.passes.base import Pass, PassContext
from anefx.report import PassRecord
from anefx.sites import Site, SiteFilter, SiteSelection
from anefx.validate import ValidationOptions, ValidationResult, Validator

#: A transformation for :func:`apply_validated`: rewrites the GraphModule it is given (a clone)
#: where the filter allows, returns (graph module, modified, stats).
Transform = Callable[[torch.fx.GraphModule, SiteFilter], tuple[torch.fx.GraphModule, bool, dict]]


@dataclass
class Applied:
    """The outcome of :func:`apply_validated`."""

    graph_module: torch.fx.GraphModule | None  #: the validated result; None when nothing is kept
    modified: bool
    stats: dict
    verdict: ValidationResult  #: of the kept result, or the first failure when nothing is kept
    sites: list[Site]  #: every site the transformation declared (first run)
    excluded: list[tuple[Site, str]]  #: sites dropped, each with its validation error
    seconds: float = 0.0  #: running the transformation (all runs)
    validation_seconds: float = 0.0
    runs: int = 0


def apply_validated(
    transform: Transform,
    gm: torch.fx.GraphModule,
    flat_inputs: Sequence,
    validator: Validator,
    *,
    max_runs: int = 48,
) -> Applied:
    """Apply ``transform`` to a clone of ``gm`` and validate it; when it fails, drop its failing
    sites (found by bisection) and keep the rest, or drop it whole. ``gm`` is never modified."""
    timing = {"run": 0.0, "check": 0.0, "runs": 0}

    def attempt(selection: SiteSelection):
        timing["runs"] += 1
        t0 = time.perf_counter()
        try:
            work, modified, stats = transform(clone_graph_module(gm), selection)
            if modified:
                refresh_meta(work, flat_inputs)
        except Exception as exc:  # a transformation that raises is rolled back like one that validates badly
            timing["run"] += time.perf_counter() - t0
            return None, False, {}, ValidationResult(False, message=f"raised {type(exc).__name__}: {exc}")
        t1 = time.perf_counter()
        timing["run"] += t1 - t0
        verdict = validator.check(work) if modified else ValidationResult(True)
        timing["check"] += time.perf_counter() - t1
        return work, modified, stats, verdict

    def done(work, modified, stats, verdict, sites, excluded) -> Applied:
        keep = work if verdict.ok else None
        return Applied(keep, modified, stats, verdict, sites, excluded, timing["run"], timing["check"], timing["runs"])

    first = SiteSelection()
    work, modified, stats, verdict = attempt(first)
    sites = list(first.visited.values())
    if verdict.ok or len(sites) < 2:
        excluded = [(site, str(verdict.message)) for site in sites] if not verdict.ok else []
        return done(work, modified, stats, verdict, sites, excluded)

    def failing(group: list[Site], message: str) -> list[tuple[Site, str]]:
        """The sites of ``group`` (which fails when enabled alone) that fail by themselves."""
        if len(group) == 1:
            return [(group[0], message)]
        found: list[tuple[Site, str]] = []
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            if timing["runs"] >= max_runs:
                return [(s, "not bisected further (too many runs)") for s in group]
            *_, v = attempt(SiteSelection(only={s.name for s in half}))
            if not v.ok:
                found += failing(half, str(v.message))
        return found or [(s, f"fails only together with others: {message}") for s in group]

    excluded = failing(sites, str(verdict.message))
    bad = {s.name for s, _ in excluded}
    if len(bad) < len(sites):
        work, modified, stats, final = attempt(SiteSelection(excluded=bad))
        if final.ok:
            return done(work, modified, stats, final, sites, excluded)
    return done(None, modified, stats, verdict, sites, excluded)


@dataclass
class PipelineResult:
    graph_module: torch.fx.GraphModule
    records: list[PassRecord]
    #: the input sets and reference outputs every pass was checked against (for the hand-off)
    validator: Validator | None = None


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[Pass, ...] = ()
    validation: ValidationOptions = field(default_factory=ValidationOptions)

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
        progress: Callable[[str], None] | None = None,
    ) -> PipelineResult:
        """Run every pass on (a clone of) ``gm``; the input graph is never modified."""
        debug = debug or DebugOptions()
        instruments = Instruments(debug, self, flat_inputs)
        validator = Validator(gm, flat_inputs, self.validation, reference_outputs)
        current = gm
        records: list[PassRecord] = []
        instruments.start(current)
        for index, p in enumerate(self.passes):
            record = PassRecord(index=index, name=p.name)
            records.append(record)
            if progress:
                progress(p.name)
            if debug.bisect_limit is not None and debug.bisect_limit >= 0 and index >= debug.bisect_limit:
                record.skipped = f"bisect limit {debug.bisect_limit}"
                instruments.bisect_line(index, p.name, ran=False)
                continue
            instruments.bisect_line(index, p.name, ran=True)
            instruments.before(index, p, current)

            def transform(work, selection, p=p):
                result = p.run(work, PassContext(flat_inputs=list(flat_inputs), sites=selection))
                return result.graph_module, bool(result.modified), dict(getattr(result, "stats", {}) or {})

            applied = apply_validated(transform, current, flat_inputs, validator)
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
        return PipelineResult(current, records, validator)
