"""``group_norm_4d`` — GroupNorm as one ``instance_norm`` on a 4-D view that keeps the last axis.

coremltools lowers ``aten.group_norm`` on (B, C, H, W) through a rank-5 view (B, G, C/G, H, W) and
nine ops (two reductions, a square root, a division …); the ANE's native layout is 4-D. Viewed as
(B, G, C/G·H, W), each group is one (b, g) row of a 4-D tensor, and GroupNorm is an instance norm
of that view followed by the per-channel weight and bias. Both views keep the last axis (W), so in
the ANE's layout (last axis padded to 64 bytes) neither moves data: GroupNorm keeps the two
reshapes the target needs, and only those.

Original::

    %y = aten.group_norm(%x, G, %w, %b, eps)             # x: (B, C, H, W) (or (B, C, L))
Result::

    %g = aten.reshape(%x, [B, G, C/G·H, W])
    %n = anefx.instance_norm_4d(%g, eps)                     # MIL: one instance_norm
    %y = aten.reshape(%n, [B, C, H, W]) * %w.view(1, C, 1, 1) + %b.view(1, C, 1, 1)

Options: none.
"""

from __future__ import annotations

import math

import torch
import torch.fx

import anefx.ir.ops  # noqa: F401 - defines anefx::instance_norm_4d
from anefx.ir.graph import call, node_arg, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten


class GroupNorm4D(Pass):
    __doc__ = __doc__
    name = "group_norm_4d"
    runs_after = frozenset({"canonicalize", "fold_constants"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.group_norm.default:
                continue
            x, groups = node.args[0], node_arg(node, 1, "num_groups")
            xs = shape(x)
            if xs is None or len(xs) not in (3, 4) or not isinstance(groups, int) or xs[1] % groups:
                continue
            if not ctx.site(node):
                continue
            weight, bias, eps = node_arg(node, 2, "weight"), node_arg(node, 3, "bias"), node_arg(node, 4, "eps", 1e-5)
            b, c, *spatial = xs
            view = [b, groups, c // groups * math.prod(spatial[:-1]), spatial[-1]]
            per_channel = [1, c] + [1] * len(spatial)
            with graph.inserting_before(node), provenance(node):
                g = call(graph, aten.reshape.default, (x, view))
                n = call(graph, torch.ops.anefx.instance_norm_4d.default, (g, float(eps)))
                y = call(graph, aten.reshape.default, (n, list(xs)))
                if weight is not None:
                    y = call(graph, aten.mul.Tensor, (y, call(graph, aten.view.default, (weight, per_channel))))
                if bias is not None:
                    y = call(graph, aten.add.Tensor, (y, call(graph, aten.view.default, (bias, per_channel))))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            rewritten += 1
        return finish(gm, bool(rewritten), rewritten=rewritten)
