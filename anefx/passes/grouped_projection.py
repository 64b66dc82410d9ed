"""``grouped_projection`` — per-group projections of channel chunks become one grouped 1x1 conv.

A block-diagonal projection is often written as G small linears applied to G equal channel chunks,
concatenated on the channel axis (grouped/multi-head projections). That is exactly one 1x1
convolution with ``groups=G`` whose weight stacks the G weights along the output axis.

Original::

    %parts = aten.chunk(%x, G, -1)                           # or split; x: (B, S, I)
    %y_g   = aten.linear(getitem(%parts, g), %w_g, %b_g)     # for g in 0..G-1, w_g: (O/G, I/G)
    %y     = aten.cat([%y_0, …, %y_{G-1}], -1)               # (B, S, O)
Result::

    %w  = aten.view(aten.cat([%w_0, …], 0), [O, I/G, 1, 1])  # a constant: folded by coremltools
    %c  = aten.conv2d(to_bc1s(%x), %w, aten.cat([%b_0, …]), groups=G)
    %y  = from_bc1s(%c)

Existing ``Conv2d(groups=G)`` layers are 4-D image convolutions: no pass touches them.

Options: none.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from anefx.analysis.layout import GLOBAL_RANKS as RANKS
from anefx.analysis.projections import Projection, emit_conv, match_projection
from anefx.ir.graph import call, dce, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


def _match(cat: torch.fx.Node) -> tuple[torch.fx.Node, list[Projection]] | None:
    if cat.op != "call_function" or cat.target != aten.cat.default:
        return None
    parts = cat.args[0]
    out = shape(cat)
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if out is None or len(out) not in RANKS or dim % len(out) != len(out) - 1 or len(parts) < 2:
        return None
    projs = [match_projection(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    if any(p is None or p.weight_is_io or len(p.x.users) != 1 for p in projs):
        return None
    split = projs[0].x.args[0] if projs[0].x.target is operator.getitem else None
    if split is None or split.op != "call_function" or split.target not in _SPLITS:
        return None
    xs = shape(split.args[0])
    sdim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if xs is None or sdim % len(xs) != len(xs) - 1 or len(split.users) != len(projs):
        return None
    for g, p in enumerate(projs):
        if p.x.target is not operator.getitem or p.x.args[0] is not split or p.x.args[1] != g:
            return None
    wshapes = {shape(p.weight) for p in projs}
    if len(wshapes) != 1 or (None in wshapes) or len({p.bias is None for p in projs}) != 1:
        return None
    (_, i_g) = next(iter(wshapes))
    if i_g * len(projs) != xs[-1]:
        return None
    return split.args[0], projs


class GroupedProjection(Pass):
    __doc__ = __doc__
    name = "grouped_projection"
    runs_after = frozenset({"canonicalize", "fold_constants"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        fused = 0
        for node in list(graph.nodes):
            m = _match(node)
            if m is None or not ctx.site(node):
                continue
            x, projs = m
            g = len(projs)
            o_g, i_g = shape(projs[0].weight)
            with graph.inserting_before(node), provenance(node):
                w = call(graph, aten.cat.default, ([p.weight for p in projs], 0))
                b = None
                if projs[0].bias is not None:
                    b = call(graph, aten.cat.default, ([p.bias for p in projs], 0))
                y = emit_conv(graph, x, len(shape(x)), w, (o_g * g, i_g), b, groups=g)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            fused += 1
        if fused:
            dce(graph)
        return finish(gm, bool(fused), fused=fused)
