"""The pass interface.

A pass is a small object with a ``name``, typed ``Options`` (a frozen dataclass) and
``run(gm, ctx) -> PassResult``. ``PassResult`` is torch.fx's own ``PassResult`` plus ``stats``, so an
anefx pass also works inside ``torch.fx.passes.infra.pass_manager.PassManager`` (call it with just a
GraphModule).

Passes read shapes from ``node.meta["val"]`` and never run the model. They may edit the GraphModule
they are given in place: the pipeline hands every pass a clone (that shares the weights) so a failed
pass is rolled back by dropping the clone.

A pass that rewrites independent places declares them as *sites*: it calls ``ctx.site(anchor)``
once per candidate place, with the node the rewrite replaces, and skips the place when that returns
False. When such a pass fails validation, the pipeline re-runs it on subsets of its sites, finds
the failing ones and keeps the others (see :mod:`anefx.ir.sites`). A pass that never calls it is kept
or rolled back whole.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult as _TorchPassResult

from anefx.ir.sites import SiteSelection


class PassResult(_TorchPassResult):
    """``(graph_module, modified)`` like torch.fx's PassResult, plus ``stats`` (what the pass did)."""

    stats: dict[str, Any]

    def __new__(cls, graph_module: torch.fx.GraphModule, modified: bool, stats: dict | None = None):
        self = super().__new__(cls, graph_module, modified)
        self.stats = dict(stats or {})
        return self


@dataclass(frozen=True)
class NoOptions:
    """This pass has no options."""


@dataclass
class PassContext:
    """What a pass may know besides the graph: the example inputs (flat, in placeholder order), the
    precision the target computes in (``"float16"`` or ``"float32"``), which of its rewrite sites
    it may rewrite, and, for a pass that declares ``needs_ranges``, the value ranges of the graph
    it gets (node name → largest finite magnitude over the validation's input sets, see
    :mod:`anefx.analysis.ranges`; None when the pipeline computes none: an fp32 target)."""

    flat_inputs: list = field(default_factory=list)
    sites: SiteSelection = field(default_factory=SiteSelection)
    precision: str = "float16"
    ranges: Mapping[str, float] | None = None

    def site(self, anchor: torch.fx.Node) -> bool:
        """Call once per candidate rewrite site, with the node the rewrite replaces; rewrite the
        site only when this returns True (the pipeline excludes sites that failed validation)."""
        return self.sites(anchor)


class Pass(abc.ABC):
    """Base class of every anefx pass. Subclasses set ``name`` and, if they have any, ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: Passes that must run before this one when both are in a pipeline: checked when a pipeline
    #: is built, so removing or reordering passes gives an error instead of a silently worse graph.
    runs_after: ClassVar[frozenset[str]] = frozenset()
    #: The pass reads ``PassContext.ranges`` (values, not only shapes): the pipeline runs the graph
    #: on the validation's input sets before it, for an fp16 target only.
    needs_ranges: ClassVar[bool] = False

    def __init__(self, options: Any = None, **overrides: Any):
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}, got {type(options).__name__}")
        if overrides:
            valid = {f.name for f in dataclasses.fields(self.Options)}
            unknown = sorted(set(overrides) - valid)
            if unknown:
                raise TypeError(f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(valid) or 'none'}")
            options = dataclasses.replace(options, **overrides)
        self.options = options

    @abc.abstractmethod
    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` (in place is fine) and say whether anything changed."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.run(gm, PassContext())

    @classmethod
    def summary(cls) -> str:
        """The docstring's first line without a leading ````name```` and separator: what the pass
        does, in one line."""
        lines = (cls.__doc__ or "").strip().splitlines()
        first = lines[0].strip() if lines else ""
        name = f"``{cls.name}``"
        return first.removeprefix(name).lstrip(" \N{EM DASH}\N{EN DASH}-:") if first.startswith(name) else first

    def with_options(self, **overrides: Any) -> Pass:
        return type(self)(self.options, **overrides)

    def __repr__(self) -> str:
        fields = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{type(self).__name__}({args})"


def finish(gm: torch.fx.GraphModule, modified: bool, **stats: Any) -> PassResult:
    """Common tail of a pass: lint and recompile when something changed, then wrap the result."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified, stats)
