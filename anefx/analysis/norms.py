"""RMSNorm in a graph, and its one-op form on the channel axis of (B, C, 1, S).

RMSNorm (Llama, Qwen, Mistral … ``*RMSNorm``: ``x * rsqrt(mean(x², -1) + eps) * w``) has no
normalisation op of its own on the ANE, and spelled out it is five ops with an ``x²`` that overflows
fp16 above 256. The identity ``rms_norm(x) = layer_norm([x, -x])[:C]`` on the channel axis makes it
one: the concatenation ``[x, -x]`` has mean 0 by construction and variance ``mean(x²)``, so
LayerNorm's ``eps`` on the variance is RMSNorm's ``eps`` inside the mean square, exactly.

* :func:`match_rms_norm` recognises the spelled-out norm from its mean square (``pow(x, 2)`` or
  ``x * x`` → ``mean(·, [-1], keepdim)`` → ``+ eps`` → ``rsqrt`` → ``x * ·``, then optionally a cast
  and a constant per-channel weight, either operand order); :func:`rms_norm_ending_at` finds the
  same norm from its result (for analyses that walk up from a use, like per-head QK-norm);
* :func:`match_layer_norm` recognises ``aten.layer_norm`` over the last axis (a per-head QK
  LayerNorm, which ``attention_bc1s`` runs as one ``channel_layer_norm`` per head chunk);
* :func:`emit_channel_rms_norm` writes the one-op form on a (B, C, 1, S) tensor. Both
  ``rms_norm_bc1s`` (norms over the hidden size) and ``attention_bc1s`` (QK-norm over ``head_dim``,
  one per head chunk) use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

import anefx.ir.ops  # noqa: F401 - defines anefx::channel_layer_norm
from anefx.ir.graph import call, dtype, is_constant, shape

aten = torch.ops.aten

_CASTS = {aten._to_copy.default, aten.to.dtype}


@dataclass
class RMSNorm:
    x: torch.fx.Node
    eps: float
    weight: torch.fx.Node | None
    cast: torch.dtype | None  # the normalised value is cast to this dtype before the weight
    last: torch.fx.Node  # the node whose value the norm's result is


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: torch.fx.Node, one) -> object | None:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _is_square_of(node, x) -> bool:
    if node.target == aten.pow.Tensor_Scalar:
        return node.args[0] is x and node.args[1] == 2
    return node.target == aten.mul.Tensor and node.args[0] is x and node.args[1] is x


def channel_weight(w, channels: int) -> bool:
    """Whether ``w`` is a constant per-channel weight of shape (channels,)."""
    return isinstance(w, torch.fx.Node) and is_constant(w) and shape(w) == (channels,)


def match_rms_norm(mean: torch.fx.Node, ranks: tuple[int, ...]) -> RMSNorm | None:
    """The RMSNorm over the last axis of a tensor of one of ``ranks`` whose mean square is ``mean``."""
    if mean.op != "call_function" or mean.target != aten.mean.dim or len(mean.args) < 3 or mean.args[2] is not True:
        return None
    sq = mean.args[0]
    if not isinstance(sq, torch.fx.Node) or sq.op != "call_function" or len(sq.users) != 1:
        return None
    x = sq.args[0]
    xs = shape(x)
    if xs is None or len(xs) not in ranks or not _is_square_of(sq, x):
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
        if channel_weight(w, xs[-1]):
            found.weight, found.last = w, nxt
    return found


def rms_norm_ending_at(node: torch.fx.Node, ranks: tuple[int, ...], depth: int = 6) -> RMSNorm | None:
    """The RMSNorm (as :func:`match_rms_norm` finds it) whose result is ``node``, if any: its mean
    square is looked for among ``node``'s ancestors up to ``depth`` ops away."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a.op != "call_function":
                    continue
                if a.target == aten.mean.dim:
                    found = match_rms_norm(a, ranks)
                    if found is not None and found.last is node:
                        return found
                nxt.append(a)
        frontier = nxt
    return None


def match_aten_rms_norm(node: torch.fx.Node, ranks: tuple[int, ...]) -> RMSNorm | None:
    """``aten.rms_norm`` over the last axis of a tensor of one of ``ranks``."""
    x, normalized = node.args[0], node.args[1]
    xs = shape(x)
    if xs is None or len(xs) not in ranks or list(normalized) != [xs[-1]]:
        return None
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    if eps is None:
        eps = torch.finfo(dtype(x)).eps
    if weight is not None and not channel_weight(weight, xs[-1]):
        return None
    return RMSNorm(x, float(eps), weight, None, node)


@dataclass
class LayerNorm:
    """``aten.layer_norm`` over the last axis (per-head QK LayerNorm, when that axis is head_dim)."""

    x: torch.fx.Node
    eps: float
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None
    last: torch.fx.Node


def match_layer_norm(node: torch.fx.Node, ranks: tuple[int, ...]) -> LayerNorm | None:
    """``aten.layer_norm`` over the last axis of a tensor of one of ``ranks``, with constant
    per-channel weight and bias (or none)."""
    if node.op != "call_function" or node.target != aten.layer_norm.default:
        return None
    x, normalized = node.args[0], node.args[1]
    xs = shape(x)
    if xs is None or len(xs) not in ranks or list(normalized) != [xs[-1]]:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    weight, bias, eps = args[2], args[3], args[4] if args[4] is not None else 1e-5
    if any(w is not None and not channel_weight(w, xs[-1]) for w in (weight, bias)):
        return None
    return LayerNorm(x, float(eps), weight, bias, node)


def emit_channel_rms_norm(
    graph: torch.fx.Graph, x4: torch.fx.Node, norm: RMSNorm, fold_weight: bool = True, memo: dict | None = None
) -> torch.fx.Node:
    """``norm`` applied to ``x4`` (B, C, 1, S) over its channel axis, as one ``channel_layer_norm`` of
    ``[x4, -x4]`` (gamma ``[w, w]`` when ``fold_weight`` allows, shared through ``memo``)."""
    channels = shape(x4)[1]
    both = call(graph, aten.cat.default, ([x4, call(graph, aten.neg.default, (x4,))], 1))
    w = norm.weight
    gamma_ok = w is not None and fold_weight and norm.cast is None and dtype(w) == dtype(norm.x)
    gamma = None
    if gamma_ok:
        memo = {} if memo is None else memo
        if ("gamma", w) not in memo:
            memo[("gamma", w)] = call(graph, aten.cat.default, ([w, w],))
        gamma = memo[("gamma", w)]
    out = call(graph, torch.ops.anefx.channel_layer_norm.default, (both, gamma, None, norm.eps))
    out = call(graph, aten.slice.Tensor, (out, 1, 0, channels))
    if norm.cast is not None:
        out = call(graph, aten._to_copy.default, (out,), {"dtype": norm.cast})
    if w is not None and not gamma_ok:
        out = call(graph, aten.mul.Tensor, (out, call(graph, aten.view.default, (w, [1, channels, 1, 1]))))
    return out


# ---------------------------------------------------------------------------------------------
# norms as scale-invariant ops (the fp16-safety passes scale their inputs)
# ---------------------------------------------------------------------------------------------

#: fp16's smallest positive (subnormal) number: the least ε a norm whose input was scaled keeps.
FP16_TINY = 2.0**-24


@dataclass
class NormOp:
    """A normalisation op (one node) as a scale-invariant function of its input: ``norm(x · s)``
    with ``ε · s²`` is ``norm(x)``."""

    node: torch.fx.Node
    x: torch.fx.Node
    eps_at: int  #: position of ε in ``node.args``
    eps: float  #: its value (the op's default when not given)


def norm_op(node: torch.fx.Node) -> NormOp | None:
    """``aten.layer_norm``, ``aten.rms_norm`` or ``anefx::channel_layer_norm`` as a :class:`NormOp`."""
    if node.op != "call_function":
        return None
    if node.target == aten.layer_norm.default:
        at, default = 4, 1e-5
    elif node.target == aten.rms_norm.default:
        at, default = 3, None
    elif node.target == torch.ops.anefx.channel_layer_norm.default:
        at, default = 3, 1e-5
    else:
        return None
    eps = node.args[at] if len(node.args) > at else node.kwargs.get("eps")
    if eps is None:
        eps = default if default is not None else torch.finfo(dtype(node.args[0]) or torch.float32).eps
    return NormOp(node, node.args[0], at, float(eps))


def scaled_eps(eps: float, s: float) -> float:
    """ε for a norm whose input is scaled by ``s``: ``ε · s²`` (the same norm), at least fp16's
    smallest positive number so that it does not flush to zero (a row of zeros would give 0/0)."""
    return max(eps * s * s, FP16_TINY) if eps > 0 else eps


def scale_norm_input(norm: NormOp, x: torch.fx.Node, s: float) -> None:
    """Make ``norm.node`` read ``x`` (its input times ``s``) with its ε scaled to match."""
    node = norm.node
    args = list(node.args) + [None] * max(0, norm.eps_at + 1 - len(node.args))
    args[0], args[norm.eps_at] = x, scaled_eps(norm.eps, s)
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "eps"}
