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

import anefx.ir.ops  # noqa: F401 - defines anefx::channel_layer_norm
from anefx.analysis.layout import GLOBAL_RANKS, from_bc1s, to_bc1s
from anefx.ir.graph import call, dce, dtype, is_constant, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten

_CASTS = {aten._to_copy.default, aten.to.dtype}


@dataclass(frozen=True)
class RMSNormBC1SOptions:
    fold_weight: bool = True


@dataclass
class RMSNorm:
    x: torch.fx.Node
    eps: float
    weight: torch.fx.Node | None
    cast: torch.dtype | None  # the normalised value is cast to this dtype before the weight
    last: torch.fx.Node  # the node whose value the rewrite replaces


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: torch.fx.Node, one) -> object | None:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _is_square_of(node, x) -> bool:
    if node.target == aten.pow.Tensor_Scalar:
        return node.args[0] is x and node.args[1] == 2
    return node.target == aten.mul.Tensor and node.args[0] is x and node.args[1] is x


def _channel_weight(w, channels: int) -> bool:
    return isinstance(w, torch.fx.Node) and is_constant(w) and shape(w) == (channels,)


def match_rms_norm(mean: torch.fx.Node) -> RMSNorm | None:
    """Recognise the RMSNorm whose mean square is ``mean``."""
    if mean.op != "call_function" or mean.target != aten.mean.dim or len(mean.args) < 3 or mean.args[2] is not True:
        return None
    sq = mean.args[0]
    if not isinstance(sq, torch.fx.Node) or sq.op != "call_function" or len(sq.users) != 1:
        return None
    x = sq.args[0]
    xs = shape(x)
    if xs is None or len(xs) not in GLOBAL_RANKS or not _is_square_of(sq, x):
        return None
    if [d % len(xs) for d in mean.args[1]] != [len(xs) - 1] or mean.kwargs.get("dtype") is not None:
        return None
    add = _only_user(mean)
    if add is None or add.target not in (aten.add.Tensor, aten.add.Scalar) or add.args[0] is not mean:
        return None
    eps = add.args[1]
    if not isinstance(eps, (int, float)) or add.kwargs.get("alpha", 1) != 1:
        return None
    rsqrt = _only_user(add)
    if rsqrt is None or rsqrt.target != aten.rsqrt.default:
        return None
    h = _only_user(rsqrt)
    if h is None or h.target != aten.mul.Tensor or _other(h, rsqrt) is not x:
        return None
    found = RMSNorm(x, float(eps), None, None, h)
    nxt = _only_user(h)
    if nxt is not None and nxt.target in _CASTS and not nxt.kwargs.get("memory_format") and dtype(nxt) is not None:
        found.cast, found.last = dtype(nxt), nxt
        nxt = _only_user(nxt)
    if nxt is not None and nxt.target == aten.mul.Tensor and shape(nxt) == xs:
        w = _other(nxt, found.last)
        if _channel_weight(w, xs[-1]):
            found.weight, found.last = w, nxt
    return found


def _match_aten_rms_norm(node: torch.fx.Node) -> RMSNorm | None:
    x, normalized = node.args[0], node.args[1]
    xs = shape(x)
    if xs is None or len(xs) not in GLOBAL_RANKS or list(normalized) != [xs[-1]]:
        return None
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    if eps is None:
        eps = torch.finfo(dtype(x)).eps
    if weight is not None and not _channel_weight(weight, xs[-1]):
        return None
    return RMSNorm(x, float(eps), weight, None, node)


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
                norm = match_rms_norm(node)
            elif node.target == aten.rms_norm.default:
                norm = _match_aten_rms_norm(node)
            else:
                continue
            if norm is None:
                continue
            with graph.inserting_before(norm.last), provenance(norm.last):
                y = self._emit(graph, norm)
            norm.last.replace_all_uses_with(y)
            rewritten += 1
        if rewritten:
            dce(graph)
        return finish(gm, bool(rewritten), rewritten=rewritten)

    def _emit(self, graph: torch.fx.Graph, norm: RMSNorm) -> torch.fx.Node:
        xs = shape(norm.x)
        rank, channels = len(xs), xs[-1]
        x4 = to_bc1s(graph, norm.x, rank)
        both = call(graph, aten.cat.default, ([x4, call(graph, aten.neg.default, (x4,))], 1))
        w = norm.weight
        gamma_ok = w is not None and self.options.fold_weight and norm.cast is None and dtype(w) == dtype(norm.x)
        gamma = call(graph, aten.cat.default, ([w, w],)) if gamma_ok else None
        out = call(graph, torch.ops.anefx.channel_layer_norm.default, (both, gamma, None, norm.eps))
        out = call(graph, aten.slice.Tensor, (out, 1, 0, channels))
        if norm.cast is not None:
            out = call(graph, aten._to_copy.default, (out,), {"dtype": norm.cast})
        if w is not None and not gamma_ok:
            out = call(graph, aten.mul.Tensor, (out, call(graph, aten.view.default, (w, [1, channels, 1, 1]))))
        return from_bc1s(graph, out, rank)
