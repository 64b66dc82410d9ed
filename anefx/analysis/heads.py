"""Where attention heads come from and go to: matching head reshuffles by simulating them.

Models split a projection into heads in many spellings (``view`` + ``transpose``, ``reshape`` +
``permute``, ``unflatten``, ``split`` of a fused QKV projection, ``expand`` + ``reshape`` for
grouped-query attention …). Rather than pattern-match each spelling, anefx walks up the chain of
pure data-movement ops and *runs it on an index tensor* (``arange`` in the source's shape). The
result says exactly which source element lands where, so one check covers every spelling:

* :func:`trace_heads` — a (B, H, S, D) tensor is, head by head, a contiguous channel block of a
  (B, S, C) tensor (or of a (B, C, 1, S) tensor): returns the source and each head's first channel.
* :func:`trace_merge` — a (B, S, H*D) tensor is the heads of a (B, H, S, D) tensor concatenated on
  channels, in order.
* :func:`lifted_projection` — a projection whose input positions are a reshuffle of a (B, S, C)
  tensor's (``nn.MultiheadAttention``'s in-projection of sequence-first rows, its out-projection of
  (S·B, C) rows) computes the same values as the projection on that tensor in (B, C, 1, S): heads
  of the former are read as channel blocks of the latter (a :class:`Lift`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from anefx.compat.torch import tree_leaves
from anefx.ir.graph import shape

aten = torch.ops.aten

MOVEMENT = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.expand.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
    aten.slice.Tensor,
    aten.select.int,
}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


def _literal(args) -> bool:
    return not any(isinstance(a, torch.fx.Node) for a in tree_leaves(list(args)))


def movement_chain(node: torch.fx.Node, max_len: int = 16) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """Walk up pure data-movement ops from ``node``; return (source, chain from source to node)."""
    chain: list[torch.fx.Node] = []
    n = node
    while len(chain) < max_len and n.op == "call_function":
        if n.target in MOVEMENT and _literal(n.args[1:]) and _literal(n.kwargs.values()):
            chain.append(n)
            n = n.args[0]
        elif n.target is operator.getitem and n.args[0].op == "call_function" and n.args[0].target in _SPLITS:
            split = n.args[0]
            if not _literal(split.args[1:]):
                return None
            chain.append(n)
            n = split.args[0]
        else:
            break
    chain.reverse()
    return n, chain


def simulate(chain: list[torch.fx.Node], x: torch.Tensor) -> torch.Tensor:
    """Apply the movement ``chain`` to the real tensor ``x`` (values only: a ``view`` is replayed as a
    ``reshape``, since ``x``'s strides are not the graph's)."""
    for n in chain:
        if n.target is operator.getitem:
            split = n.args[0]
            x = split.target(x, *split.args[1:], **split.kwargs)[n.args[1]]
        elif n.target == aten.view.default:
            x = x.reshape(n.args[1])
        else:
            x = n.target(x, *n.args[1:], **n.kwargs)
    return x


def index_map(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.Tensor] | None:
    """Where ``node``'s elements come from: walk up the movement ops to their source and replay them
    on ``arange`` in the source's shape. Returns (source, indices into the flattened source)."""
    found = movement_chain(node)
    if found is None:
        return None
    src, chain = found
    src_shape = shape(src)
    if src_shape is None or not chain:
        return None
    numel = 1
    for d in src_shape:
        numel *= d
    try:
        return src, simulate(chain, torch.arange(numel).reshape(src_shape))
    except Exception:
        return None


def _index_in_bc1s(src_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Indices of the source's elements, arranged as (B, C, 1, S)."""
    idx = torch.arange(int(torch.tensor(src_shape).prod())).reshape(src_shape)
    if len(src_shape) == 3:
        return idx.permute(0, 2, 1).unsqueeze(2)
    if len(src_shape) == 4 and src_shape[2] == 1:
        return idx
    return None


@dataclass(frozen=True)
class Lift:
    """A projection (1x1 ``conv2d`` or ``linear``) whose input positions are a reshuffle of the
    positions of ``x`` ((B, S, C) or (B, C, 1, S)), each keeping its whole channel vector:
    ``nn.MultiheadAttention`` projects the
    (S, B) or (S·B) rows of a sequence-first tensor. The same projection computed on ``x`` in
    (B, C, 1, S) holds the same values, at (b, s) instead."""

    conv: torch.fx.Node
    x: torch.fx.Node
    swap: bool = False  # ``x`` holds (S, C, 1, B) (a sequence-first tensor taken for (B, C, 1, S)): swap them


@dataclass
class Heads:
    """A (B, H, S, D) tensor read head by head from channel blocks of ``source``."""

    source: torch.fx.Node  # (B, S, C) or (B, C, 1, S); with ``lift``, the projection it lifts
    offsets: list[int]  # first channel of each head in the source
    head_dim: int
    source_is_bc1s: bool
    lift: Lift | None = None  # the source is ``lift.conv`` computed on ``lift.x`` in (B, C, 1, S)
    #: the source is laid out (B, S, 1, C), positions on axis 1 (keys stored the way the score
    #: product reads them, e.g. an encoder-decoder's cross-attention keys): its (B, C, 1, S) form is
    #: one transpose, which cancels against the attention's own K transpose
    by_position: bool = False


def trace_heads(node: torch.fx.Node, heads: int | None = None) -> Heads | None:
    """The heads of ``node`` (B, H, S, D) — or (B·H, S, D) with ``heads`` = H, as ``bmm`` attention
    holds them — when each is a channel block of one (B, S, C) or (B, C, 1, S) tensor."""
    out = shape(node)
    if out is None or len(out) != (3 if heads else 4):
        return None
    mapped = index_map(node)
    if mapped is None:
        return None
    src, r = mapped
    if heads:
        r = r.reshape(out[0] // heads, heads, out[1], out[2])
    return heads_from_index(src, r)


def heads_from_index(src: torch.fx.Node, r: torch.Tensor) -> Heads | None:
    """``r`` (B, H, S, D) indexes the flattened ``src``: the heads it reads when each head is a channel
    block of ``src`` (B, S, C), (B, C, 1, S) or (B, S, 1, C) (``by_position``), else None."""
    src_shape = shape(src)
    bc = _index_in_bc1s(src_shape) if src_shape is not None else None
    if r.dim() != 4 or r.numel() == 0:
        return None
    b, _, s, d = r.shape
    if bc is None or bc.shape[0] != b or bc.shape[3] != s:
        by_position = _heads_by_position(src, r)
        if by_position is not None:
            return by_position
        found = lifted_projection(src)
        if found is not None and (found[2][0], found[2][3]) == (s, b) != (b, s):
            found = lifted_projection(src, swap=True)
        if found is None or found[2][0] != b or found[2][3] != s:
            return None
        lift, zidx, zshape = found
        z = torch.arange(zidx.numel()).reshape(zshape)
        heads = _heads_of_blocks(src, z, zidx.reshape(-1)[r], True)
        return None if heads is None else Heads(src, heads.offsets, d, True, lift)
    found = _heads_of_blocks(src, bc, r, len(src_shape) == 4)
    return found if found is not None else _heads_by_position(src, r)


def _heads_by_position(src: torch.fx.Node, r: torch.Tensor) -> Heads | None:
    """The heads ``r`` reads of a (B, S, 1, C) ``src`` (positions on axis 1), as channel blocks of its
    (B, C, 1, S) transpose."""
    src_shape = shape(src)
    if src_shape is None or len(src_shape) != 4 or src_shape[2] != 1 or src_shape[1] != r.shape[2]:
        return None
    if src_shape[0] != r.shape[0]:
        return None
    by_position = torch.arange(_numel(src_shape)).reshape(src_shape).permute(0, 3, 2, 1)
    found = _heads_of_blocks(src, by_position, r, True)
    if found is not None:
        found.by_position = True
    return found


def _numel(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def _heads_of_blocks(src: torch.fx.Node, bc: torch.Tensor, r: torch.Tensor, is_bc1s: bool) -> Heads | None:
    h, d = r.shape[1], r.shape[3]
    # where each source element sits in (B, C, 1, S): channel of the first element of every head
    channel_of = torch.empty(bc.numel(), dtype=torch.long)
    channel_of[bc.reshape(-1)] = torch.arange(bc.shape[1]).view(1, -1, 1, 1).expand_as(bc).reshape(-1)
    offsets = []
    for head in range(h):
        c0 = int(channel_of[r[0, head, 0, 0]])
        if c0 + d > bc.shape[1]:
            return None
        block = bc[:, c0 : c0 + d, 0, :]  # (B, D, S)
        if not torch.equal(block.transpose(1, 2), r[:, head]):
            return None
        offsets.append(c0)
    return Heads(src, offsets, d, is_bc1s)


def _is_pointwise_conv(node: torch.fx.Node) -> bool:
    """A 1x1 ``conv2d`` with stride 1, no padding, no dilation and one group: a projection of each
    position's channel vector (what ``linear_to_conv`` makes)."""
    if node.op != "call_function" or node.target != aten.conv2d.default:
        return False
    w = shape(node.args[1])
    rest = list(node.args[3:]) + [None] * 4
    stride, padding, dilation, groups = rest[:4]
    return (
        w is not None
        and len(w) == 4
        and w[2:] == (1, 1)
        and stride in (None, 1, [1, 1], (1, 1))
        and padding in (None, 0, [0, 0], (0, 0))
        and dilation in (None, 1, [1, 1], (1, 1))
        and groups in (None, 1)
        and not node.kwargs
    )


def _as_nchw(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A projection operand laid out (N, C, H, W): conv2d's own, or a linear's (N, C) / (A, B, C)
    with the channel axis moved to 1 (as (N, C, 1, 1) / (A, C, 1, B))."""
    if rank == 2:
        return t[:, :, None, None]
    if rank == 3:
        return t.permute(0, 2, 1).unsqueeze(2)
    return t


def _from_nchw(t: torch.Tensor, rank: int) -> torch.Tensor:
    if rank == 2:
        return t[:, :, 0, 0]
    if rank == 3:
        return t[:, :, 0, :].permute(0, 2, 1)
    return t


def _projection_rank(node: torch.fx.Node) -> int | None:
    """The rank of ``node``'s input when it projects each position's channel vector with constant
    weights: a 1x1 conv (4) or a ``linear`` on (N, C) or (A, B, C); else None."""
    if _is_pointwise_conv(node):
        return 4
    if node.op != "call_function" or node.target != aten.linear.default:
        return None
    w, xs = shape(node.args[1]), shape(node.args[0])
    if w is None or xs is None or len(w) != 2 or len(xs) not in (2, 3) or not _is_weight(node.args[1]):
        return None
    b = node.args[2] if len(node.args) > 2 else None
    return len(xs) if b is None or _is_weight(b) else None


def _is_weight(node) -> bool:
    from anefx.ir.graph import is_constant

    return isinstance(node, torch.fx.Node) and is_constant(node)


def position_map(node: torch.fx.Node, rank: int = 4, x: torch.fx.Node | None = None):
    """Where each position of ``node`` (laid out (N, C, H, W), see :func:`_as_nchw`) comes from when
    it is a reshuffle of the positions of a (B, S, C) or (B, C, 1, S) tensor, each position keeping
    its whole channel vector in order: ``(x, b, s, x's (B, C, 1, S) shape)`` with ``b`` and ``s`` of
    shape (N, H, W), or None. ``x`` fixes the source (the walk up the movement ops must end there)."""
    mapped = index_map(node)
    if mapped is None or mapped[1].dim() != rank or (x is not None and mapped[0] is not x):
        return None
    src, r = mapped[0], _as_nchw(mapped[1], rank)
    bc = _index_in_bc1s(shape(src)) if shape(src) is not None else None
    if bc is None or bc.shape[1] != r.shape[1]:
        return None
    big_b, c, _, big_s = bc.shape
    flat = torch.empty(bc.numel(), dtype=torch.long)
    flat[bc.reshape(-1)] = torch.arange(bc.numel())  # source element -> its position in (B, C, 1, S)
    first = flat[r[:, 0]]  # (N, H, W): where each position's channel 0 sits
    if (first // big_s % c != 0).any():
        return None
    b, s = first // (c * big_s), first % big_s
    if not torch.equal(bc[b, :, 0, s].permute(0, 3, 1, 2), r):
        return None
    return src, b, s, (big_b, c, 1, big_s)


def lifted_projection(node: torch.fx.Node, swap: bool = False) -> tuple[Lift, torch.Tensor, tuple[int, ...]] | None:
    """``node``, a projection (1x1 conv or ``linear``, constant weights) over a reshuffle of the
    positions of a (B, S, C) or (B, C, 1, S) tensor ``x``, as the :class:`Lift` computing it on
    ``x`` in (B, C_out, 1, S), with the index of each element of ``node`` in that result (``node``'s
    shape) and the result's shape; else None. ``swap``: ``x``'s batch and sequence axes are taken
    the other way round (a sequence-first tensor), the projection computed on ``x`` transposed."""
    rank = _projection_rank(node)
    if rank is None:
        return None
    found = position_map(node.args[0], rank)
    if found is None:
        return None
    x, b, s, (big_b, _, _, big_s) = found
    if swap:
        b, s, big_b, big_s = s, b, big_s, big_b
    c_out = shape(node.args[1])[0]
    co = torch.arange(c_out).view(1, c_out, 1, 1)
    zidx = (b.unsqueeze(1) * c_out + co) * big_s + s.unsqueeze(1)  # (N, C_out, H, W)
    return Lift(node, x, swap), _from_nchw(zidx, rank), (big_b, c_out, 1, big_s)


def trace_merge(node: torch.fx.Node, heads_node: torch.fx.Node, hs: tuple[int, ...] | None = None) -> bool:
    """Whether ``node`` (B, S, H*D) is ``heads_node`` (B, H, S, D) with heads concatenated in order
    (``hs``: the (B, H, S, D) shape of a 3-D (B·H, S, D) ``heads_node``)."""
    hs, out = hs or shape(heads_node), shape(node)
    if hs is None or out is None or len(out) != 3:
        return False
    mapped = index_map(node)
    if mapped is None or mapped[0] is not heads_node:
        return False
    r = mapped[1]
    b, h, s, d = hs
    idx = torch.arange(b * h * s * d).reshape(b, h, s, d)
    return tuple(r.shape) == out and torch.equal(r, idx.transpose(1, 2).reshape(b, s, h * d))


def merge_users(
    heads_node: torch.fx.Node, max_depth: int = 6, hs: tuple[int, ...] | None = None
) -> list[torch.fx.Node]:
    """Rank-3 descendants of ``heads_node`` reached through movement ops only that merge its heads
    (``hs``: see :func:`trace_merge`)."""
    found = []
    frontier = [heads_node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op != "call_function" or u.target not in MOVEMENT:
                    continue
                if len(shape(u) or ()) == 3 and trace_merge(u, heads_node, hs):
                    found.append(u)
                else:
                    nxt.append(u)
        frontier = nxt
    return found
