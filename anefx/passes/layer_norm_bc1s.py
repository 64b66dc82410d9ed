"""``layer_norm_bc1s`` — LayerNorm over the channel axis of a (B, C, 1, S) tensor.

``nn.LayerNorm(C)`` on a channels-last (B, S, C) tensor normalises its last axis. In (B, C, 1, S)
that axis is axis 1, which ``aten.layer_norm`` cannot address, so the pass emits anefx's own op
``anefx::channel_layer_norm`` (:mod:`anefx.ir.ops`): one op, whatever the weights, that the Core ML
target converts to one MIL ``layer_norm`` over ``axes=[1]`` and the Core AI target decomposes into
reductions over axis 1. (Spelled with reductions, whether coremltools fuses LayerNorm back depends
on the values of the weights: stock DistilBERT fresh from its config kept 24 ``reduce_mean``.)
Numerically it is the same LayerNorm (same eps, biased variance).

Original::

    %y = aten.layer_norm(%x, [C], %w, %b, 1e-05)       # x: (B, S, C)
Result::

    %x4 = aten.unsqueeze(aten.permute(%x, [0, 2, 1]), 2)      # (B, C, 1, S)
    %y4 = anefx.channel_layer_norm(%x4, %w, %b, 1e-05)        # MIL: layer_norm(axes=[1])
    %y  = aten.permute(aten.squeeze(%y4, 2), [0, 2, 1])      # (B, S, C)

Options: none.
"""

from __future__ import annotations

import torch
import torch.fx

import anefx.ir.ops  # noqa: F401 - defines anefx::channel_layer_norm
from anefx.analysis.layout import RANKS, from_bc1s, to_bc1s
from anefx.ir.graph import call, provenance, shape, views_to_reshapes
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten


def emit_channel_layer_norm(graph: torch.fx.Graph, x4, weight, bias, eps: float, channels: int):
    """LayerNorm over axis 1 of the (B, C, 1, S) node ``x4``; returns the (B, C, 1, S) result node."""
    del channels  # the op reads C from x4
    return call(graph, torch.ops.anefx.channel_layer_norm.default, (x4, weight, bias, eps))


_SPLITS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int}
_MOVES = {aten.permute.default, aten.transpose.int}


def _over_head_dim(x: torch.fx.Node, depth: int = 4) -> bool:
    """Whether the last axis of the rank-4 ``x`` is ``head_dim`` of a head split ((B, S, C) viewed
    as (B, S, H, D), possibly transposed): a per-head QK LayerNorm, which ``attention_bc1s`` runs per
    head chunk. (A rank-4 image (B, H, W, C) is ConvNeXt's channels-last LayerNorm: this pass's.)"""
    d = shape(x)[-1]
    for _ in range(depth):
        if not isinstance(x, torch.fx.Node) or x.op != "call_function":
            return False
        if x.target in _SPLITS:
            src, out = shape(x.args[0]), shape(x)
            return src is not None and len(src) == 3 and len(out) == 4 and out[-1] == d and src[-1] == out[-2] * d
        if x.target not in _MOVES:
            return False
        x = x.args[0]
    return False


class LayerNormBC1S(Pass):
    __doc__ = __doc__
    name = "layer_norm_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.layer_norm.default:
                continue
            x, normalized = node.args[0], node.args[1]
            xs = shape(x)
            if xs is None or len(xs) not in RANKS or list(normalized) != [xs[-1]]:
                continue
            if (len(xs) == 4 and _over_head_dim(x)) or not ctx.site(node):
                continue
            args = list(node.args) + [None] * (5 - len(node.args))
            weight, bias = args[2], args[3]
            eps = args[4] if args[4] is not None else 1e-5
            with graph.inserting_before(node), provenance(node):
                x4 = to_bc1s(graph, x, len(xs))
                y4 = emit_channel_layer_norm(graph, x4, weight, bias, float(eps), xs[-1])
                y = from_bc1s(graph, y4, len(xs))
            node.replace_all_uses_with(y)
            views_to_reshapes(y)
            graph.erase_node(node)
            rewritten += 1
        return finish(gm, bool(rewritten), rewritten=rewritten)
