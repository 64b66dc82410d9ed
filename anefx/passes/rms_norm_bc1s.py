"""``rms_norm_bc1s`` — RMSNorm as one LayerNorm over the channel axis of (B, C, 1, S).

RMSNorm (Llama, Qwen, Mistral … ``*RMSNorm``: ``x * rsqrt(mean(x², -1) + eps) * w``) has no
normalisation op of its own on the ANE, and spelled out it is five ops with an ``x²`` that overflows
fp16 above 256. The pass uses the identity ``rms_norm(x) = layer_norm([x, -x])[:C]`` on the channel
axis: the concatenation ``[x, -x]`` has mean 0 by construction and variance ``mean(x²)``, so
LayerNorm's ``eps`` on the variance is RMSNorm's ``eps`` inside the mean square, exactly. The
LayerNorm is ``anefx::channel_layer_norm`` (one MIL ``layer_norm`` over axis 1, see
``layer_norm_bc1s``), with the weight as its gamma (``[w, w]``), and the first half is kept.

Matched: ``pow(x, 2)`` (or ``x * x``) → ``mean(·, [-1], keepdim)`` → ``+ eps`` → ``rsqrt`` →
``x * ·``, then optionally a cast and a multiplication by a constant per-channel weight (either
operand order, also ``(1 + w)``), on (B, S, C) or (B, C) activations; and ``aten.rms_norm``.
Norms over the last axis of per-head tensors (QK-norm) belong to the attention pass.

Original::

    %p = aten.pow(%x, 2)                        # x: (B, S, C)
    %m = aten.mean(%p, [-1], True)
    %r = aten.rsqrt(aten.add(%m, 1e-06))
    %y = aten.mul(%w, aten.mul(%x, %r))
Result::

    %x4 = aten.unsqueeze(aten.permute(%x, [0, 2, 1]), 2)                 # (B, C, 1, S)
    %xx = aten.cat([%x4, aten.neg(%x4)], 1)                              # (B, 2C, 1, S)
    %n  = anefx.channel_layer_norm(%xx, aten.cat([%w, %w]), None, 1e-06)  # MIL: layer_norm(axes=[1])
    %y  = aten.permute(aten.squeeze(aten.slice(%n, 1, 0, C), 2), [0, 2, 1])

Options:
  fold_weight: carry the weight as the LayerNorm's gamma (default); False multiplies after the slice
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.layout import GLOBAL_RANKS, from_bc1s, to_bc1s
from anefx.analysis.norms import RMSNorm, emit_channel_rms_norm, match_aten_rms_norm, match_rms_norm
from anefx.ir.graph import dce, provenance, shape, views_to_reshapes
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten


@dataclass(frozen=True)
class RMSNormBC1SOptions:
    fold_weight: bool = True


class RMSNormBC1S(Pass):
    __doc__ = __doc__
    name = "rms_norm_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants"})
    Options = RMSNormBC1SOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten.mean.dim:
                norm = match_rms_norm(node, GLOBAL_RANKS)
            elif node.target == aten.rms_norm.default:
                norm = match_aten_rms_norm(node, GLOBAL_RANKS)
            else:
                continue
            if norm is None or not ctx.site(node):
                continue
            with graph.inserting_before(norm.last), provenance(norm.last):
                y = self._emit(graph, norm)
            norm.last.replace_all_uses_with(y)
            views_to_reshapes(y)
            rewritten += 1
        if rewritten:
            dce(graph)
        return finish(gm, bool(rewritten), rewritten=rewritten)

    def _emit(self, graph: torch.fx.Graph, norm: RMSNorm) -> torch.fx.Node:
        rank = len(shape(norm.x))
        x4 = to_bc1s(graph, norm.x, rank)
        return from_bc1s(graph, emit_channel_rms_norm(graph, x4, norm, self.options.fold_weight), rank)
