"""Rewrite sites: the unit a failed transformation is rolled back by.

A transformation (a pass, a legalization step) that rewrites the graph at independent places asks,
once per candidate place, whether it may rewrite it: ``if not site(node): continue``, where ``node``
is the place's anchor (the node the rewrite replaces: the ``linear``, the ``layer_norm``, the
attention output …). :class:`SiteSelection` answers and records every site it was asked about, so a
transformation that fails validation can be re-run on subsets of its sites (see
:func:`anefx.driver.pipeline.apply_validated`) and only the failing ones are dropped.

Sites are keyed by the anchor's node name, which is stable across re-runs of the transformation on
the same input graph.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch.fx

from anefx.ir.graph import op_name, source_location

#: What a transformation calls once per candidate site: True when it may rewrite it.
SiteFilter = Callable[[torch.fx.Node], bool]


@dataclass(frozen=True)
class Site:
    """One rewrite site: its anchor node's name, op and the user's source line (when known)."""

    name: str
    op: str
    where: str | None = None

    def __str__(self) -> str:
        text = f"%{self.name} ({self.op})"
        return f"{text} at {self.where}" if self.where else text


@dataclass
class SiteSelection:
    """Allows every site except ``excluded`` (and, when ``only`` is given, only those); records the
    sites it was asked about, in order."""

    excluded: Collection[str] = frozenset()
    only: Collection[str] | None = None
    visited: dict[str, Site] = field(default_factory=dict)

    def __call__(self, node: torch.fx.Node) -> bool:
        if node.name not in self.visited:
            self.visited[node.name] = Site(node.name, op_name(node), source_location(node))
        return node.name not in self.excluded and (self.only is None or node.name in self.only)


def every_site(node: torch.fx.Node) -> bool:
    """The filter of a transformation run outside the pipeline: every site may be rewritten."""
    return True
