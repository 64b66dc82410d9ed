"""Projections by a weight, in every spelling, and the 1x1 conv that computes one in (B, C, 1, S).

``linear`` and the linears in disguise (``matmul``/``mm``/``addmm``/``einsum`` with a parameter or
constant operand) are all one :class:`Projection`; ``linear_to_conv`` and ``grouped_projection``
both rewrite them into :func:`emit_conv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.layout import from_bc1s, to_bc1s
from anefx.ir.graph import call, is_constant, shape

aten = torch.ops.aten


@dataclass
class Projection:
    """A matched projection ``y = x @ W^T + b`` with ``W`` given as an (O, I) node (or a recipe)."""

    x: torch.fx.Node
    weight: torch.fx.Node
    weight_is_io: bool  # the weight node is (I, O) and must be transposed
    bias: torch.fx.Node | None


def _einsum_projection(node: torch.fx.Node) -> Projection | None:
    eq, operands = node.args[0], node.args[1]
    if len(operands) != 2 or "->" not in eq or "." in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    for (xs, x), (ws, w) in (((a, operands[0]), (b, operands[1])), ((b, operands[1]), (a, operands[0]))):
        if not is_constant(w) or is_constant(x) or len(ws) != 2 or not xs:
            continue
        i = xs[-1]
        if i not in ws or i in out:
            continue
        o = ws.replace(i, "")
        if len(o) != 1 or o in xs or out != xs[:-1] + o:
            continue
        return Projection(x, w, weight_is_io=(ws == i + o), bias=None)
    return None


def match_projection(node: torch.fx.Node) -> Projection | None:
    """Recognise ``node`` as a projection of an activation by a constant weight."""
    if node.op != "call_function":
        return None
    t = node.target
    if t == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if is_constant(w) and not is_constant(x):
            return Projection(x, w, weight_is_io=False, bias=b)
    elif t in (aten.matmul.default, aten.mm.default):
        x, w = node.args
        ws = shape(w)
        if is_constant(w) and not is_constant(x) and ws is not None and len(ws) == 2:
            return Projection(x, w, weight_is_io=True, bias=None)
    elif t == aten.addmm.default:
        b, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bs = shape(b)
        if is_constant(w) and is_constant(b) and not is_constant(x) and bs is not None and len(bs) == 1:
            return Projection(x, w, weight_is_io=True, bias=b)
    elif t == aten.einsum.default:
        return _einsum_projection(node)
    return None


def emit_conv(
    graph: torch.fx.Graph,
    x: torch.fx.Node,
    rank: int,
    weight_oi: torch.fx.Node,
    out_in: tuple[int, int],
    bias: torch.fx.Node | None,
    groups: int = 1,
    memo: dict | None = None,
) -> torch.fx.Node:
    """Insert ``from_bc1s(conv2d(to_bc1s(x), weight_oi viewed (O, I/groups, 1, 1), bias))``.

    ``weight_oi`` must be contiguous (a parameter, or a ``clone``/``cat`` of parameters), so the view
    is free in PyTorch; coremltools folds it into the constant.
    """
    x4 = to_bc1s(graph, x, rank, memo)
    w4 = call(graph, aten.view.default, (weight_oi, [*out_in, 1, 1]))
    conv = call(graph, aten.conv2d.default, (x4, w4, bias, [1, 1], [0, 0], [1, 1], groups))
    return from_bc1s(graph, conv, rank)
