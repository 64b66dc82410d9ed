"""``to_bc1s`` — choose which tensors live in (B, C, 1, S), with the fewest layout changes.

The lowering passes (``linear_to_conv``, ``layer_norm_bc1s``, attention) compute their op in
(B, C, 1, S) and change layout right around it. Between them sit layout-agnostic ops (activations,
residual adds, dropout, softmax, reductions, concat/split/slice …, see :mod:`anefx.analysis.layout_rules`).
This pass decides, for every such op, whether it runs in (B, C, 1, S) or in the original layout, so
that the number of layout changes left is *minimal*, then rewrites the graph accordingly.

That choice is a minimum s-t cut (``networkx.minimum_cut``) on the dataflow graph: the source side
is (B, C, 1, S), the sink side the original layout; the outputs of layout changes out of
(B, C, 1, S) and the inputs of changes into it are tied to the source, graph inputs/outputs and ops
without a rule to the sink; each value that crosses sides costs one layout change (one unit of
capacity on an auxiliary edge, shared by all its consumers). The graph's inputs and outputs keep
their original layout and shapes.

Original (after ``linear_to_conv`` on two projections with a residual add between)::

    %c1  = aten.conv2d(to_bc1s(%x), %w1, %b1)
    %h   = aten.gelu(from_bc1s(%c1))
    %c2  = aten.conv2d(to_bc1s(%h), %w2, %b2)
    %y   = aten.add(%x, from_bc1s(%c2))
    return %y
Result::

    %x4  = to_bc1s(%x)                          # the one layout change in
    %h4  = aten.gelu(aten.conv2d(%x4, %w1, %b1))
    %y4  = aten.add(%x4, aten.conv2d(%h4, %w2, %b2))
    return from_bc1s(%y4)                       # the one layout change out

After each assignment the permute pairs left over are cancelled (the ``fold_transposes`` rules),
which can expose more ops to move; rounds repeat until nothing changes, so a second run changes
nothing.

Options:
  max_rounds: bound on (fold, assign) rounds (default 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx

from anefx.analysis.layout import from_bc1s, match_from_bc1s, match_to_bc1s, to_bc1s
from anefx.analysis.layout_rules import Rule, rule_for
from anefx.analysis.transposes import fold_transposes
from anefx.ir.graph import dce, provenance, rank, views_to_reshapes
from anefx.passes.base import Pass, PassContext, PassResult, finish

SOURCE, SINK = "__bc1s__", "__orig__"


def count_layout_changes(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if match_to_bc1s(n) or match_from_bc1s(n))


class _Problem:
    """The min-cut instance built from a graph."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.to_finals: dict[torch.fx.Node, torch.fx.Node] = {}  # t -> its channels-last input
        self.to_inner: set[torch.fx.Node] = set()
        self.from_finals: dict[torch.fx.Node, torch.fx.Node] = {}  # u -> its (B, C, 1, S) input
        self.ranks: dict[torch.fx.Node, int] = {}  # layout change -> the rank of its channels-last side
        for n in graph.nodes:
            m = match_to_bc1s(n)
            if m is not None:
                self.to_finals[n], self.ranks[n] = m
                self.to_inner.update(p for p in n.all_input_nodes if p is not m[0])
                continue
            m = match_from_bc1s(n)
            if m is not None:
                self.from_finals[n], self.ranks[n] = m
        # candidates: nodes with a rule (split rules first, so their getitems can refer to them)
        self.rules: dict[torch.fx.Node, Rule] = {}
        splits: set[torch.fx.Node] = set()
        for n in graph.nodes:
            if n in self.from_finals or n in self.to_finals or n in self.to_inner:
                continue
            r = rule_for(n, splits)
            if r is not None:
                self.rules[n] = r
                if r.is_split:
                    splits.add(n)

    def solve(self) -> set[torch.fx.Node]:
        """The candidates that should live in (B, C, 1, S)."""
        g = nx.DiGraph()
        g.add_node(SOURCE)
        g.add_node(SINK)
        for u in self.from_finals:
            g.add_edge(SOURCE, u)  # no capacity attribute = infinite
        for t in self.to_finals:
            g.add_edge(SOURCE, t)
        consumers: dict[torch.fx.Node, list] = {}
        for n in self.graph.nodes:
            if n in self.to_inner:
                continue
            if n in self.to_finals:
                consumers.setdefault(self.to_finals[n], []).append(n)
                continue
            rule = self.rules.get(n)
            if rule is not None and rule.tied_to is not None:
                g.add_edge(rule.tied_to, n)  # a getitem lives where its split lives
                g.add_edge(n, rule.tied_to)
            edges = set(rule.edges) if rule is not None else set()
            for v in n.all_input_nodes:
                if v in edges:
                    consumers.setdefault(v, []).append(n)
                elif rule is not None and v is rule.tied_to:
                    continue
                elif v in self.rules or v in self.from_finals:
                    consumers.setdefault(v, []).append(("needs_orig", v))
            if rule is None and n not in self.from_finals:
                g.add_edge(n, SINK)
        for v, users in consumers.items():
            out_aux, in_aux = ("out", v), ("in", v)
            g.add_edge(v, out_aux, capacity=1)
            g.add_edge(in_aux, v, capacity=1)
            for c in dict.fromkeys(users, None):
                if isinstance(c, tuple):
                    g.add_edge(c, SINK)
                g.add_edge(out_aux, c)
                g.add_edge(c, in_aux)
        try:
            self.cut_value, (reachable, _) = nx.minimum_cut(g, SOURCE, SINK)
        except nx.NetworkXUnbounded:  # pragma: no cover - would mean a source tied to a sink
            self.cut_value = math.inf
            return set()
        return {n for n in reachable if isinstance(n, torch.fx.Node) and n in self.rules}


@dataclass(frozen=True)
class ToBC1SOptions:
    #: rounds of (cancel permute pairs, min-cut assignment) until nothing moves
    max_rounds: int = 4


class ToBC1S(Pass):
    __doc__ = __doc__
    name = "to_bc1s"
    runs_after = frozenset(
        {
            "grouped_projection",
            "linear_to_conv",
            "layer_norm_bc1s",
            "rms_norm_bc1s",
            "split_modulation",
            "token_batch_norm",
            "cache_write_bc1s",
            "attention_bc1s",
            "attention_chunks",
        }
    )
    Options = ToBC1SOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        before = count_layout_changes(graph)
        moved, folded = 0, 0
        for _ in range(self.options.max_rounds):
            n = self._assign(gm)
            # cancelling the permute pairs left over can expose ops that may then move too
            f = sum(fold_transposes(gm).values())
            moved, folded = moved + n, folded + f
            if not n and not f:
                break
        modified = bool(moved or folded)
        after = count_layout_changes(graph)
        if not modified:
            return finish(gm, False, layout_changes=before)
        return finish(gm, True, bc1s_ops=moved, folded=folded, layout_changes_before=before, layout_changes_after=after)

    def _assign(self, gm: torch.fx.GraphModule) -> int:
        """One min-cut assignment and rewrite; returns how many ops moved into (B, C, 1, S)."""
        graph = gm.graph
        problem = _Problem(graph)
        if not problem.from_finals and not problem.to_finals:
            return 0
        chosen = problem.solve()
        if not chosen:
            return 0
        bc: dict[torch.fx.Node, torch.fx.Node] = {u: y for u, y in problem.from_finals.items()}
        to_memo = {(x, problem.ranks[t]): t for t, x in problem.to_finals.items()}
        from_memo = {(y, problem.ranks[u]): u for u, y in problem.from_finals.items()}

        def bc_of(v: torch.fx.Node) -> torch.fx.Node:
            if v in bc:
                return bc[v]
            return to_bc1s(graph, v, rank(v), to_memo)

        order = [n for n in graph.nodes if n in chosen]
        for n in order:
            with graph.inserting_before(n), provenance(n):
                bc[n] = problem.rules[n].emit(graph, bc_of)
        # layout changes into (B, C, 1, S) of a value that now lives there disappear
        for t, x in problem.to_finals.items():
            if x in bc and bc[x] is not t:
                t.replace_all_uses_with(bc[x])
        # consumers that stay in the original layout get one shared change out
        for n in order:
            if problem.rules[n].is_split:
                continue
            outside = [u for u in n.users if u not in chosen]
            if not outside:
                continue
            back = from_bc1s(graph, bc[n], problem.rules[n].rank, from_memo)
            for u in outside:
                u.replace_input_with(n, back)
            views_to_reshapes(back)
        for n in reversed(order):
            if not n.users:
                graph.erase_node(n)
        dce(graph)
        return len(order)
