"""The permute and reshape algebra: rules that cancel, merge and sink data movement.

``fold_transposes`` applies them to a fixed point as a pass; ``to_bc1s`` applies them between its
layout assignments (cancelling the permute pairs an assignment leaves can expose more ops to
move). The rules, one line each, are listed in the ``fold_transposes`` pass's documentation.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from anefx.analysis.heads import movement_chain, simulate
from anefx.analysis.layout import moves_data
from anefx.analysis.layout_rules import BINARY, UNARY
from anefx.ir.graph import call, dce, infer_meta, is_constant, provenance, replace_node, shape, views_to_reshapes

aten = torch.ops.aten

SHAPE_ONLY = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_MAX_REPLAY = 1 << 22  # elements: larger chains are not replayed on ``arange``
_SINK_UNARY = UNARY - {aten._to_copy.default, aten.to.dtype}


def perm_of(node: torch.fx.Node) -> list[int] | None:
    """The permutation a ``permute`` or ``transpose`` node applies (axes normalised), else None."""
    if node.op != "call_function":
        return None
    if node.target == aten.permute.default:
        s = shape(node)
        return [d % len(s) for d in node.args[1]] if s is not None else list(node.args[1])
    if node.target == aten.transpose.int:
        s = shape(node)
        if s is None:
            return None
        p = list(range(len(s)))
        a, b = node.args[1] % len(s), node.args[2] % len(s)
        p[a], p[b] = p[b], p[a]
        return p
    return None


def _split_groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[list[int]] | None:
    """For a reshape from ``before`` to ``after`` that only splits axes, the sizes each axis of
    ``before`` splits into (in order); None for any other reshape."""
    groups, j = [], 0
    for d in before:
        group, size = [], 1
        if d == 1 and j < len(after) and after[j] == 1:
            group, j = [1], j + 1
        while size < d and j < len(after):
            group.append(after[j])
            size *= after[j]
            j += 1
        if size != d or not group:
            return None
        groups.append(group)
    return groups if j == len(after) else None


def einsum_permutation(node: torch.fx.Node) -> list[int] | None:
    """The permutation a one-operand ``einsum`` applies (``'nhwpqc->nchpwq'``: DiT's unpatchify), or
    None when ``node`` is not such an einsum. coremltools converts it to one MIL ``transpose``."""
    if node.op != "call_function" or node.target != aten.einsum.default or len(node.args) < 2:
        return None
    eq, operands = node.args[0], node.args[1]
    if not isinstance(eq, str) or len(operands) != 1 or "->" not in eq or "." in eq:
        return None
    src, dst = (part.replace(" ", "") for part in eq.split("->"))
    if len(set(src)) != len(src) or sorted(src) != sorted(dst):
        return None
    return [src.index(c) for c in dst]


_MATMULS = {aten.matmul.default, aten.bmm.default}


def _kept_for_matmul(node: torch.fx.Node, start: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether the identity chain ending at ``node`` stays as it is rather than becoming one reshape
    from ``start`` to ``out``: ``node`` swaps its last two axes (one of them a unit axis) for matrix
    products only, which coremltools folds into their ``transpose_x``/``transpose_y``
    (``common::fuse_transpose_matmul``), and the chain before it keeps the last axis (a view), while
    the one reshape would move data (:func:`anefx.analysis.layout.moves_data`). A keys-last decode's
    query column (B, H·D, 1, 1) → (B, H, D, 1) read as ``q^T @ K`` is one: the reshape to
    (B, H, 1, D) would copy the padded column."""
    perm, src = perm_of(node), node.args[0]
    rank = len(out)
    if perm != [*range(rank - 2), rank - 1, rank - 2] or not isinstance(src, torch.fx.Node):
        return False
    before = shape(src)
    if before is None or 1 not in before[-2:] or not node.users:
        return False
    if not all(u.op == "call_function" and u.target in _MATMULS and node in u.args[:2] for u in node.users):
        return False
    return moves_data(start, out) and not moves_data(start, before)


def fold_transposes(gm: torch.fx.GraphModule, max_iterations: int = 32) -> dict[str, int]:
    """Apply the rules to ``gm`` until nothing changes (at most ``max_iterations`` rounds); return
    what was done."""
    return _Rules(max_iterations).fold(gm)


class _Rules:
    def __init__(self, max_iterations: int):
        self.max_iterations = max_iterations

    def fold(self, gm: torch.fx.GraphModule) -> dict[str, int]:
        """Apply the rules to a fixed point; return what was done."""
        stats = {"merged": 0, "cancelled": 0, "sunk": 0, "reshapes_folded": 0}
        graph = gm.graph
        for _ in range(self.max_iterations):
            changed = False
            for node in list(graph.nodes):
                if node.graph is not graph or node.op != "call_function":
                    continue
                changed |= self._rewrite(graph, node, stats)
            dce(graph)
            if not changed:
                break
        return stats

    def _rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node, stats: dict) -> bool:
        if self._fold_identity_chain(graph, node, stats):
            return True
        perm = perm_of(node)
        if perm is not None:
            src = node.args[0]
            if perm == list(range(len(perm))):
                replace_node(graph, node, src)
                stats["cancelled"] += 1
                return True
            if node.target == aten.transpose.int:
                node.target, node.args = aten.permute.default, (src, perm)
                return True
            inner = perm_of(src) if isinstance(src, torch.fx.Node) else None
            if inner is not None:
                node.args = (src.args[0], [inner[i] for i in perm])
                infer_meta(node)
                stats["merged"] += 1
                return True
            return self._sink(graph, node, perm, stats)
        if node.target in (aten.squeeze.dim, aten.squeeze.dims) and self._sink_squeeze(graph, node, stats):
            return True
        if node.target in _RESHAPES and self._sink_below_reshape(graph, node, stats):
            return True
        if node.target in SHAPE_ONLY:
            return self._fold_shapes(graph, node, stats)
        return False

    @staticmethod
    def _sink_below_reshape(graph: torch.fx.Graph, node: torch.fx.Node, stats: dict) -> bool:
        """``reshape(permute(x, p))`` whose reshape only splits axes → ``permute(reshape(x), p')``, when
        that lets the permute merge with a permute below or the reshape with a reshape above (DiT's
        unpatchify: the change out of (B, C, 1, S), a split into patches and a permute become one
        reshape and one permute)."""
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or len(src.users) != 1:
            return False
        perm = perm_of(src)
        in_shape, out_shape = shape(src), shape(node)
        if perm is None or in_shape is None or out_shape is None:
            return False
        groups = _split_groups(in_shape, out_shape)
        if groups is None:
            return False
        x = src.args[0]
        merges_below = bool(node.users) and all(perm_of(u) is not None for u in node.users)
        merges_above = isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in SHAPE_ONLY
        if not (merges_below or merges_above):
            return False
        inverse = [perm.index(a) for a in range(len(perm))]
        new_shape = [d for a in range(len(perm)) for d in groups[inverse[a]]]
        offsets, at = [], 0
        for a in range(len(perm)):
            offsets.append(at)
            at += len(groups[inverse[a]])
        new_perm = [offsets[perm[k]] + i for k in range(len(perm)) for i in range(len(groups[k]))]
        with graph.inserting_before(node), provenance(node):
            r = call(graph, aten.reshape.default, (x, new_shape))
            p = call(graph, aten.permute.default, (r, new_perm))
        replace_node(graph, node, p)
        graph.erase_node(src)
        stats["sunk"] += 1
        return True

    def _sink_squeeze(self, graph: torch.fx.Graph, node: torch.fx.Node, stats: dict) -> bool:
        """``unary(squeeze(x, d))`` → ``squeeze(unary(x), d)``, so an ``unsqueeze`` below can cancel it."""
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in _SINK_UNARY or user.args[0] is not node:
            return False
        with graph.inserting_before(user), provenance(user):
            moved = call(graph, user.target, (node.args[0], *user.args[1:]), dict(user.kwargs))
            squeezed = call(graph, node.target, (moved, *node.args[1:]))
        replace_node(graph, user, squeezed)
        graph.erase_node(node)
        stats["sunk"] += 1
        return True

    def _sink(self, graph: torch.fx.Graph, node: torch.fx.Node, perm: list[int], stats: dict) -> bool:
        """Move ``node`` (a permute with one user) below an elementwise user."""
        if len(node.users) != 1:
            return False
        user = next(iter(node.users))
        if user.op != "call_function":
            return False
        src = node.args[0]
        if user.target in _SINK_UNARY and user.args[0] is node:
            with graph.inserting_before(user), provenance(user):
                moved = call(graph, user.target, (src, *user.args[1:]), dict(user.kwargs))
                new_perm = call(graph, aten.permute.default, (moved, perm))
            replace_node(graph, user, new_perm)
            views_to_reshapes(new_perm)
            graph.erase_node(node)
            stats["sunk"] += 1
            return True
        if user.target in BINARY and len(BINARY[user.target]) == 2:
            a, b = user.args[0], user.args[1]
            other = b if a is node else a
            if other is node:
                return False
            if isinstance(other, torch.fx.Node) and not is_constant(other):
                other_perm = perm_of(other)
                if other_perm != perm or len(other.users) != 1 or shape(other) != shape(node):
                    return False
                new_other, drop = other.args[0], other
            else:  # a scalar, or a constant we permute the other way (folded by coremltools)
                new_other, drop = self._unpermute_constant(graph, user, other, perm), None
                if new_other is None:
                    return False
            with graph.inserting_before(user), provenance(user):
                args = list(user.args)
                args[0], args[1] = (src, new_other) if a is node else (new_other, src)
                moved = call(graph, user.target, tuple(args), dict(user.kwargs))
                new_perm = call(graph, aten.permute.default, (moved, perm))
            replace_node(graph, user, new_perm)
            views_to_reshapes(new_perm)
            graph.erase_node(node)
            if drop is not None:
                graph.erase_node(drop)
            stats["sunk"] += 1
            return True
        return False

    @staticmethod
    def _unpermute_constant(graph, user: torch.fx.Node, other, perm: list[int]):
        """``other`` as seen before ``permute(·, perm)``: pad to the rank, permute by the inverse."""
        if not isinstance(other, torch.fx.Node):
            return other
        s = shape(other)
        if s is None or len(s) > len(perm):
            return None
        if all(d == 1 for d in s):
            return other
        inverse = [perm.index(i) for i in range(len(perm))]
        with graph.inserting_before(user), provenance(user):
            padded = other
            if len(s) < len(perm):
                padded = call(graph, aten.view.default, (other, [1] * (len(perm) - len(s)) + list(s)))
            return call(graph, aten.permute.default, (padded, inverse))

    @staticmethod
    def _fold_identity_chain(graph: torch.fx.Graph, node: torch.fx.Node, stats: dict) -> bool:
        """A mixed chain of permutes and shape-only ops ending at ``node`` that leaves every element
        where it was (e.g. ``(B, C, 1, S)`` → ``(B, S, H, D)`` → ``(B, H, D, S)`` → ``(B, C, 1, S)``)."""
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_function":
            return False
        movement = SHAPE_ONLY | {aten.permute.default, aten.transpose.int}
        if node.target not in movement or src.target not in movement:
            return False
        if perm_of(node) is None and perm_of(src) is None and src.target in SHAPE_ONLY:
            return False  # shape-only chains: the rules of _fold_shapes
        v = node.meta.get("val")
        out = tuple(v.shape) if isinstance(v, torch.Tensor) else None
        if out is None or math.prod(out) > _MAX_REPLAY:
            return False
        found = movement_chain(node)
        if found is None or any(n.target not in movement for n in found[1]):
            return False
        start, chain = found
        s = start.meta.get("val")
        if not isinstance(s, torch.Tensor) or s.numel() != math.prod(out):
            return False
        if _kept_for_matmul(node, tuple(s.shape), out):
            return False
        r = simulate(chain, torch.arange(s.numel()).reshape(s.shape))
        if not torch.equal(r.reshape(-1), torch.arange(s.numel())):
            return False
        if tuple(s.shape) == out:
            replace_node(graph, node, start)
        else:
            node.target, node.args, node.kwargs = aten.reshape.default, (start, list(out)), {}
        stats["reshapes_folded"] += 1
        return True

    def _fold_shapes(self, graph: torch.fx.Graph, node: torch.fx.Node, stats: dict) -> bool:
        src = node.args[0]
        if not isinstance(src, torch.fx.Node):
            return False
        out = shape(node)
        if out is None:
            return False
        if shape(src) == out and shape(src) is not None:
            replace_node(graph, node, src)
            stats["reshapes_folded"] += 1
            return True
        start = src
        chain = [node]
        while start.op == "call_function" and start.target in SHAPE_ONLY and len(start.users) == 1:
            chain.append(start)
            start = start.args[0]
            if shape(start) == out:
                replace_node(graph, node, start)
                stats["reshapes_folded"] += 1
                return True
        # merge a chain into one reshape only if it already holds one: squeeze/unsqueeze-only chains
        # stay as they are (coremltools emits expand_dims/squeeze for them, not reshape)
        if len(chain) >= 2 and shape(start) is not None and any(c.target in _RESHAPES for c in chain):
            node.target, node.args, node.kwargs = aten.reshape.default, (start, list(out)), {}
            stats["reshapes_folded"] += 1
            return True
        return False
