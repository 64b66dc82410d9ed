"""How each layout-agnostic op is computed on (B, C, 1, S) tensors.

A rule says which operands carry the layout (``edges``: same-rank activations, whose layout change
costs a transpose) and how to emit the op on (B, C, 1, S) inputs. Ops without a rule keep the
original layout; ``to_bc1s`` changes layout around them.

============================  ===============================================================
ops                           in (B, C, 1, S)
============================  ===============================================================
activations, dropout, casts   unchanged
add/sub/mul/div/where/…       unchanged; lower-rank or constant operands are broadcast-mapped
softmax/log_softmax           ``dim`` remapped (channels → 1, sequence → 3)
mean/sum/amax/amin            dims remapped; ``keepdim=False`` only when it drops the sequence
cat, split, slice             ``dim`` remapped
============================  ===============================================================
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.layout import GLOBAL_RANKS as RANKS
from anefx.analysis.layout import bc1s_axis, broadcast_to_bc1s
from anefx.ir.graph import call, is_constant, rank

aten = torch.ops.aten

UNARY = {
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.neg.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.abs.default,
    aten.erf.default,
    aten.reciprocal.default,
    aten.hardtanh.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.softplus.default,
    aten.clamp.default,
    aten.pow.Tensor_Scalar,
    aten.dropout.default,
    aten.clone.default,
    aten.alias.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.mul.Scalar,
    aten.div.Scalar,
}
BINARY = {
    aten.add.Tensor: (0, 1),
    aten.sub.Tensor: (0, 1),
    aten.mul.Tensor: (0, 1),
    aten.div.Tensor: (0, 1),
    aten.maximum.default: (0, 1),
    aten.minimum.default: (0, 1),
    aten.pow.Tensor_Tensor: (0, 1),
    aten.where.self: (0, 1, 2),
    aten.masked_fill.Scalar: (0, 1),
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
SPLIT = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}

BcOf = Callable[[torch.fx.Node], torch.fx.Node]


@dataclass
class Rule:
    """``edges``: operands whose layout matters; ``emit(graph, bc_of)``: the op in (B, C, 1, S)."""

    edges: list[torch.fx.Node]
    emit: Callable[[torch.fx.Graph, BcOf], torch.fx.Node]
    rank: int
    #: split outputs are lists: their getitems share the split's layout
    is_split: bool = False
    #: for a getitem of a split: the split it is tied to
    tied_to: torch.fx.Node | None = None


def _copy(graph, node, args, kwargs=None):
    new = call(graph, node.target, tuple(args), dict(node.kwargs if kwargs is None else kwargs))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    return new


def rule_for(node: torch.fx.Node, split_candidates: set[torch.fx.Node]) -> Rule | None:
    """The (B, C, 1, S) rule for ``node``, or None when it must stay in the original layout."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is operator.getitem:
        src = node.args[0]
        if src in split_candidates:
            return Rule(
                [], lambda g, bc: call(g, operator.getitem, (bc(src), node.args[1])), rank(node) or 0, tied_to=src
            )
        return None
    out_rank = rank(node)
    if t in SPLIT:
        x = node.args[0]
        in_rank = rank(x)
        if in_rank not in RANKS or any(u.target is not operator.getitem for u in node.users):
            return None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)

        def emit_split(g, bc):
            return _copy(g, node, (bc(x), node.args[1], bc1s_axis(in_rank, dim)), {})

        return Rule([x], emit_split, in_rank, is_split=True)
    if out_rank not in RANKS:
        return None
    if t in UNARY:
        x = node.args[0]
        if rank(x) != out_rank:
            return None
        return Rule([x], lambda g, bc: _copy(g, node, (bc(x), *node.args[1:])), out_rank)
    if t in BINARY:
        positions = BINARY[t]
        edges = []
        for i in positions:
            a = node.args[i] if i < len(node.args) else None
            if isinstance(a, torch.fx.Node) and rank(a) == out_rank and not is_constant(a):
                edges.append(a)

        def emit_binary(g, bc):
            args = list(node.args)
            for i in positions:
                a = args[i] if i < len(args) else None
                if not isinstance(a, torch.fx.Node):
                    continue
                args[i] = bc(a) if a in edges else broadcast_to_bc1s(g, a, out_rank)
            return _copy(g, node, args)

        return Rule(edges, emit_binary, out_rank) if edges else None
    if t in SOFTMAX:
        x, dim = node.args[0], node.args[1]
        return Rule([x], lambda g, bc: _copy(g, node, (bc(x), bc1s_axis(out_rank, dim), *node.args[2:])), out_rank)
    if t in REDUCE:
        return _reduce_rule(node, out_rank)
    if t == aten.cat.default:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if any(rank(x) != out_rank for x in tensors):
            return None
        edges = [x for x in tensors if not is_constant(x)]

        def emit_cat(g, bc):
            parts = [bc(x) if x in edges else broadcast_to_bc1s(g, x, out_rank) for x in tensors]
            return _copy(g, node, (parts, bc1s_axis(out_rank, dim)), {})

        return Rule(edges, emit_cat, out_rank)
    if t == aten.unsqueeze.default and out_rank == 3 and rank(node.args[0]) == 2 and node.args[1] % 3 == 1:
        # (B, C) -> (B, 1, C): both live in (B, C, 1, 1) (an adaLN modulation vector): no op at all
        x = node.args[0]
        return Rule([x], lambda g, bc: bc(x), out_rank)
    if t == aten.slice.Tensor:
        x = node.args[0]
        if rank(x) != out_rank:
            return None
        dim = node.args[1] if len(node.args) > 1 else 0
        rest = node.args[2:]
        return Rule([x], lambda g, bc: _copy(g, node, (bc(x), bc1s_axis(out_rank, dim), *rest)), out_rank)
    return None


def _reduce_rule(node: torch.fx.Node, out_rank: int) -> Rule | None:
    x = node.args[0]
    in_rank = rank(x)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if in_rank not in RANKS or dims is None:
        return None
    dims = [d % in_rank for d in ([dims] if isinstance(dims, int) else dims)]
    if not dims:
        return None
    # without keepdim, only dropping the sequence axis of (B, S, C) keeps a (B, C, 1, 1)-shaped result
    if not keepdim and not (in_rank == 3 and dims == [1] and out_rank == 2):
        return None
    new_dims = [bc1s_axis(in_rank, d) for d in dims]
    extra = node.args[3:] if len(node.args) > 3 else ()

    def emit_reduce(g, bc):
        return _copy(g, node, (bc(x), new_dims, True, *extra), {k: v for k, v in node.kwargs.items() if k != "keepdim"})

    return Rule([x], emit_reduce, out_rank)
