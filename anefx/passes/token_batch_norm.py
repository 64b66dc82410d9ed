"""``token_batch_norm`` — BatchNorm over flattened tokens becomes a per-channel affine on the tokens.

Hybrid vision models (LeViT and its kin) apply ``BatchNorm1d`` to tokens by flattening (B, S, C)
to (B·S, C) and reshaping back. In inference that is a per-channel scale and shift, which needs no
flattening: spelled as ``x * scale + shift`` on the (B, S, C) tokens, ``to_bc1s`` keeps it in
(B, C, 1, S) with the projections around it, where the flatten/reshape pair would force the tokens
out of it (a transpose in and one out, per norm).

Original::

    %f = aten.flatten(%x, 0, 1)                                    # x: (B, S, C)
    %n = aten.batch_norm(%f, %w, %b, %mean, %var, False, m, eps)   # eval: running statistics
    %y = aten.reshape_as(%n, %x)                                   # (or reshape/view to x's shape)
Result::

    %scale = %w * aten.rsqrt(%var + eps)                           # constants: folded by coremltools
    %y = %x * %scale + (%b - %mean * %scale)

Options: none.
"""

from __future__ import annotations

import torch
import torch.fx

from anefx.ir.graph import call, is_constant, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
_FLATTEN = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_BACK = {aten.reshape_as.default, aten.view_as.default, aten.view.default, aten.reshape.default}


def _match(bn: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(tokens x, the reshape back) around an inference ``batch_norm`` over (B·S, C)."""
    if bn.op != "call_function" or bn.target != aten.batch_norm.default or len(bn.args) < 8:
        return None
    flat, w, b, mean, var, training = bn.args[:6]
    if training or not all(a is None or (isinstance(a, torch.fx.Node) and is_constant(a)) for a in (w, b, mean, var)):
        return None
    if mean is None or var is None or not isinstance(flat, torch.fx.Node) or flat.target not in _FLATTEN:
        return None
    x = flat.args[0]
    xs, fs = shape(x), shape(flat)
    if xs is None or fs is None or len(xs) != 3 or fs != (xs[0] * xs[1], xs[2]) or len(flat.users) != 1:
        return None
    if len(bn.users) != 1:
        return None
    back = next(iter(bn.users))
    if back.op != "call_function" or back.target not in _BACK or shape(back) != xs:
        return None
    return x, back


class TokenBatchNorm(Pass):
    __doc__ = __doc__
    name = "token_batch_norm"
    runs_after = frozenset({"canonicalize"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for bn in list(graph.nodes):
            m = _match(bn)
            if m is None or not ctx.site(bn):
                continue
            x, back = m
            w, b, mean, var = bn.args[1:5]
            eps = float(bn.args[7])
            with graph.inserting_before(back), provenance(bn):
                scale = call(graph, aten.rsqrt.default, (call(graph, aten.add.Tensor, (var, eps)),))
                if w is not None:
                    scale = call(graph, aten.mul.Tensor, (w, scale))
                shift = call(graph, aten.neg.default, (call(graph, aten.mul.Tensor, (mean, scale)),))
                if b is not None:
                    shift = call(graph, aten.add.Tensor, (b, shift))
                y = call(graph, aten.add.Tensor, (call(graph, aten.mul.Tensor, (x, scale)), shift))
            back.replace_all_uses_with(y)
            for n in (back, bn, bn.args[0]):
                graph.erase_node(n)
            rewritten += 1
        return finish(gm, bool(rewritten), rewritten=rewritten)
