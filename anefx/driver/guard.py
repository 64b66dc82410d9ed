"""Never worse than stock, per region: the guard run after the passes.

Every transpose or reshape is a memory copy on the ANE, and anefx exists to remove them; yet a
rewrite that pays off in a transformer (a projection as a conv in (B, C, 1, S)) can add them
elsewhere (an isolated ``einsum('bsd,de->bse', x, W)`` between (B, S, C) neighbours gains a
transpose in and one out, where the stock conversion has none). The guard compares the layout
changes of the rewritten graph with those of the captured (stock) graph and keeps the regions that
came out worse in their original form:

* **Estimate, no second conversion.** :func:`layout_change` counts the FX nodes that coremltools
  turns into a MIL ``transpose`` (``permute``/``transpose``/``t`` of an activation, identity
  permutations and swaps of the last two axes that only matrix products read, which coremltools
  folds into them, excluded, a one-operand permuting ``einsum``) or ``reshape`` (``view``/``reshape``/
  ``reshape_as``/``flatten``/``unflatten`` that change the shape), and the two reshapes of
  coremltools' own ``group_norm`` lowering; ``squeeze``/``unsqueeze`` become ``squeeze``/
  ``expand_dims``, and ops on constants are folded, so neither counts. On the test zoo this is within 2 of the real
  ``op_histogram()`` counts (coremltools cancels a few transposes by itself).
* **Regions.** A region is a connected group of rewrite sites (``networkx.connected_components``)
  of the captured graph, joined through the ops that move with them: layout-agnostic ops (those
  ``to_bc1s`` may place in (B, C, 1, S)), data movement, attention. The model's own convolutions,
  graph inputs/outputs and ops with no (B, C, 1, S) form separate regions. Each layout change of
  the rewritten graph is charged to the region of the captured node it was made for
  (:func:`anefx.ir.graph.origin`); each of the captured graph to its own region.
* **Fallback per region.** When a region has more layout changes than in the captured graph, the
  pipeline is run again with that region's sites refused (:func:`Pipeline.run`'s ``refused``), so
  the region keeps its original form and every other region keeps its rewrite; validation runs on
  the result as on any pipeline run. Rounds repeat (at most ``max_rounds``) while a region is still
  worse. Nothing is re-run when no region is worse: the common case costs one count over the graph.
  A region with more layout changes than stock is still kept rewritten when they move fewer bytes
  (:func:`moved_bytes`: fp16, last axis padded to 64 bytes, a view that copies nothing moves
  none): attention over a KV cache read as it lies views one token's query where the stock form
  transposes the whole cache.

The report (``compiled.report.guard``) names every kept region: its sites (pass, node, op, source
line) and its layout changes in the captured graph, in anefx's graph before and after the fallback.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx

from anefx.analysis.layout import moves_data, padded_bytes
from anefx.analysis.layout_rules import rule_for
from anefx.analysis.transposes import einsum_permutation
from anefx.driver.pipeline import Pipeline, PipelineResult
from anefx.ir.graph import is_constant, origin, shape
from anefx.ir.sites import Site

aten = torch.ops.aten

TRANSPOSES = {aten.permute.default, aten.permute_copy.default, aten.transpose.int, aten.t.default}
TRANSPOSES |= {aten.swapaxes.default, aten.movedim.int}
RESHAPES = {aten.view.default, aten.view_copy.default, aten.reshape.default, aten._unsafe_view.default}
RESHAPES |= {aten.flatten.using_ints, aten.unflatten.int, aten.reshape_as.default, aten.view_as.default}
#: data movement that joins a region (besides the ops above): it carries a tensor from site to site
_MOVEMENT = TRANSPOSES | RESHAPES | {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
_MOVEMENT |= {aten.unsqueeze.default, aten.expand.default, aten.contiguous.default}
#: attention between activations: rewritten by the attention passes as a whole
_ATTENTION = {
    aten.matmul.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.einsum.default,
    aten.scaled_dot_product_attention.default,
}
#: passes whose sites never change a layout (spellings, constants, fp16 mask values): never refused
NEUTRAL_PASSES = frozenset({"canonicalize", "fold_constants", "fp16_mask_values"})


def _permutation(node: torch.fx.Node) -> list[int] | None:
    out = shape(node)
    if out is None:
        return None
    if node.target in (aten.permute.default, aten.permute_copy.default):
        return [d % len(out) for d in node.args[1]]
    if node.target in (aten.transpose.int, aten.swapaxes.default):
        p = list(range(len(out)))
        a, b = node.args[1] % len(out), node.args[2] % len(out)
        p[a], p[b] = p[b], p[a]
        return p
    if node.target == aten.t.default:
        return [1, 0] if len(out) == 2 else [0]
    return None  # movedim: always a transpose


#: ops coremltools lowers with layout changes of their own: ``group_norm`` views its input as
#: (B, G, C/G, *spatial) and back
LOWERED = {aten.group_norm.default: ("reshape", "reshape"), aten.native_group_norm.default: ("reshape", "reshape")}


def layout_change(node: torch.fx.Node) -> tuple[str, ...]:
    """The MIL ``transpose``/``reshape`` ops coremltools converts ``node`` into on an activation
    (ops on constants are folded): ``("transpose",)``, ``("reshape",)``, two for a ``group_norm``,
    or ``()``."""
    if node.op != "call_function":
        return ()
    if node.target in LOWERED and not is_constant(node):
        return LOWERED[node.target]
    if node.target not in TRANSPOSES | RESHAPES:
        perm = einsum_permutation(node)  # a one-operand einsum that permutes: one MIL transpose
        return ("transpose",) if perm is not None and perm != sorted(perm) else ()
    src = node.args[0] if node.args else None
    if not isinstance(src, torch.fx.Node) or is_constant(node):
        return ()
    if node.target in RESHAPES:
        before, after = shape(src), shape(node)
        return ("reshape",) if before is None or before != after else ()
    perm = _permutation(node)
    if perm is not None and perm == list(range(len(perm))):
        return ()
    return () if _into_matmul(node, perm) else ("transpose",)


_MATMULS = {aten.matmul.default, aten.bmm.default}


def _into_matmul(node: torch.fx.Node, perm: list[int] | None) -> bool:
    """A swap of the last two axes read only by matrix products: coremltools folds it into their
    ``transpose_x`` / ``transpose_y`` (``common::fuse_transpose_matmul``), no MIL ``transpose`` is left."""
    rank = len(perm) if perm is not None else 0
    if rank < 2 or perm != [*range(rank - 2), rank - 1, rank - 2]:
        return False
    return bool(node.users) and all(
        u.op == "call_function" and u.target in _MATMULS and node in u.args[:2] for u in node.users
    )


def layout_changes(gm: torch.fx.GraphModule) -> collections.Counter:
    """The estimated MIL ``transpose`` and ``reshape`` counts of ``gm``'s conversion."""
    return collections.Counter(k for n in gm.graph.nodes for k in layout_change(n))


@dataclass
class Region:
    """A connected group of rewrite sites of the captured graph."""

    index: int
    nodes: set[str]
    #: (pass name, site) for every site anchored in the region
    sites: list[tuple[str, Site]] = field(default_factory=list)

    def describe(self) -> list[dict[str, Any]]:
        return [{"pass": p, "site": s.name, "op": s.op, "where": s.where} for p, s in self.sites]


def find_regions(captured: torch.fx.GraphModule, sites: Mapping[str, Collection[Site]]) -> list[Region]:
    """The regions of ``captured`` that hold at least one site of a layout-changing pass."""
    graph = captured.graph
    anchored: dict[str, list[tuple[str, Site]]] = collections.defaultdict(list)
    names = {n.name for n in graph.nodes}
    for pass_name, declared in sites.items():
        if pass_name in NEUTRAL_PASSES:
            continue
        for s in dict.fromkeys(declared):
            if s.name in names:
                anchored[s.name].append((pass_name, s))
    members: set[torch.fx.Node] = set()
    splits: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function" or is_constant(n):
            continue
        rule = rule_for(n, splits)
        if rule is not None and rule.is_split:
            splits.add(n)
        if n.name in anchored or rule is not None or n.target in _MOVEMENT or n.target in _ATTENTION:
            members.add(n)
    g = nx.Graph()
    g.add_nodes_from(members)
    g.add_edges_from((n, v) for n in members for v in _data_inputs(n) if v in members)
    order = {n: i for i, n in enumerate(graph.nodes)}
    regions = []
    for component in sorted(nx.connected_components(g), key=lambda c: min(order[n] for n in c)):
        found = [ps for n in sorted(component, key=order.__getitem__) for ps in anchored.get(n.name, ())]
        if found:
            regions.append(Region(len(regions), {n.name for n in component}, found))
    return regions


def _data_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs whose values flow through ``node``: data movement reads only its first argument
    (``reshape_as(x, like)`` takes only the shape of ``like``)."""
    if node.target in _MOVEMENT and isinstance(node.args[0], torch.fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


def _owner(node: torch.fx.Node, owners: Mapping[str, int], captured_names: Collection[str]) -> int | None:
    """The region a node of the rewritten graph is charged to: its origin's, or (for a node made
    outside any rewrite's provenance) its first input's."""
    for _ in range(64):
        name = origin(node)
        if name in captured_names:
            return owners.get(name)
        inputs = node.all_input_nodes
        if not inputs:
            return None
        node = inputs[0]
    return None


def charged(gm: torch.fx.GraphModule, owners: Mapping[str, int], captured_names: Collection[str]):
    """Layout changes of ``gm`` per region index (None: outside every region)."""
    counts: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if kinds := layout_change(n):
            counts[_owner(n, owners, captured_names)] += len(kinds)
    return counts


def moved_bytes(node: torch.fx.Node) -> int:
    """Bytes a layout change reads and writes on the ANE (fp16, last axis padded to 64 bytes), once
    per MIL op it becomes (``group_norm``'s lowering: two reshapes of the same size); none for a
    view that copies no memory in that layout (:func:`anefx.analysis.layout.moves_data`: a reshape
    that keeps the last axis, a transpose of unit axes), as the traffic estimate counts it."""
    src = node.all_input_nodes[0] if node.all_input_nodes else None
    before, after = shape(src), shape(node)
    kinds = layout_change(node)
    if kinds and before is not None and after is not None and len(kinds) == 1:
        perm = _permutation(node) if kinds[0] == "transpose" else None
        if (kinds[0] == "reshape" or perm is not None) and not moves_data(tuple(before), tuple(after), perm):
            return 0
    return len(kinds) * (padded_bytes(before) + padded_bytes(after))


def charged_bytes(gm: torch.fx.GraphModule, owners: Mapping[str, int], captured_names: Collection[str]):
    """Bytes moved by the layout changes of ``gm`` per region index (None: outside every region)."""
    total: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if layout_change(n):
            total[_owner(n, owners, captured_names)] += moved_bytes(n)
    return total


@dataclass
class GuardOutcome:
    result: PipelineResult
    #: what goes into ``Report.guard``
    info: dict[str, Any]


def stock_pipeline(pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with only the passes that never change a layout (:data:`NEUTRAL_PASSES`: the
    spellings converters need, constants, fp16-safe mask values): the stock form of the captured
    graph, validated like any pipeline run."""
    return pipeline.without(*(n for n in pipeline.names if n not in NEUTRAL_PASSES))


def never_worse(
    captured: torch.fx.GraphModule,
    result: PipelineResult,
    rerun: Callable[[dict[str, set[str]]], PipelineResult],
    *,
    stock_form: Callable[[], PipelineResult] | None = None,
    max_rounds: int = 4,
) -> GuardOutcome:
    """Compare ``result`` with ``captured`` region by region; re-run the pipeline (``rerun(refused)``,
    refused: pass name -> site names) with the worse regions refused until none is worse.

    Each round finds the regions again from every site declared so far: refusing a site can expose
    others (four linears that ``grouped_projection`` had merged become ``linear_to_conv`` sites).
    When the graph is still worse than the captured one after the rounds (layout changes outside
    every region, or sites the guard cannot refuse), ``stock_form()`` (the pipeline of
    :func:`stock_pipeline`) is what ships, and ``info["shipped"]`` says so."""
    names = {n.name for n in captured.graph.nodes}
    info: dict[str, Any] = {
        "stock": _total(layout_changes(captured)),
        "anefx_before": _total(layout_changes(result.graph_module)),
        "reruns": 0,
    }
    refused: dict[str, set[str]] = collections.defaultdict(set)
    seen: dict[str, dict[Site, None]] = collections.defaultdict(dict)
    kept: list[dict[str, Any]] = []
    current = result
    for round_ in range(max_rounds + 1):
        for pass_name, declared in current.sites.items():
            seen[pass_name].update(dict.fromkeys(declared))
        regions = find_regions(captured, seen)
        if round_ == 0:
            info["regions"] = len(regions)
        owners = {name: r.index for r in regions for name in r.nodes}
        stock, ours = charged(captured, owners, names), charged(current.graph_module, owners, names)
        stock_bytes = charged_bytes(captured, owners, names)
        ours_bytes = charged_bytes(current.graph_module, owners, names)
        worse = [
            r
            for r in regions
            if _worse(ours[r.index], ours_bytes[r.index], stock[r.index], stock_bytes[r.index])
            and any(s.name not in refused[p] for p, s in r.sites)
        ]
        if not worse or round_ == max_rounds:
            break
        for r in worse:
            entry = next((k for k in kept if k["nodes"] & r.nodes), None)
            if entry is None:
                entry = {"nodes": set(), "sites": [], "stock": stock[r.index], "anefx": ours[r.index]}
                kept.append(entry)
            entry["nodes"] |= r.nodes
            entry["sites"] += [d for d in r.describe() if d not in entry["sites"]]
            for pass_name, s in r.sites:
                refused[pass_name].add(s.name)
        current = rerun({k: set(v) for k, v in refused.items() if v})
        info["reruns"] += 1
    for i, entry in enumerate(kept):
        nodes = entry.pop("nodes")
        own = dict.fromkeys(nodes, 0)
        entry["region"] = i
        entry["stock"] = charged(captured, own, names)[0]
        entry["after"] = charged(current.graph_module, own, names)[0]
        entry["reason"] = f"{entry['anefx']} layout changes where the captured graph has {entry['stock']}"
    info["kept"] = kept
    info["anefx"] = _total(layout_changes(current.graph_module))
    #: still more than stock overall: layout changes outside every region, or sites the guard cannot
    #: refuse (anchored on nodes the captured graph does not have)
    info["worse_than_stock"] = sum(info["anefx"].values()) > sum(info["stock"].values())
    if info["worse_than_stock"] and stock_form is not None:
        # the refusals did not reach stock: ship the stock form, never the worse one
        current = stock_form()
        info["shipped"] = "stock"
        info["worse_counts"] = info["anefx"]
        info["anefx"] = _total(layout_changes(current.graph_module))
        # the stock form is the stock conversion as anefx ships it (its legalization may respell a
        # gather of a mask as a reshape, one more in the estimate): never "worse than stock"
        info["worse_than_stock"] = False
    return GuardOutcome(current, info)


def _worse(count: int, moved: int, stock_count: int, stock_moved: int) -> bool:
    """More layout changes than stock, unless they move fewer bytes (a whole KV cache transposed
    once moves more than a few one-token reshapes)."""
    return count > stock_count and moved >= stock_moved


def _total(counts: Mapping[str, int]) -> dict[str, int]:
    return {"transpose": counts.get("transpose", 0), "reshape": counts.get("reshape", 0)}
