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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

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
    return not any(isinstance(a, torch.fx.Node) for a in torch.utils._pytree.tree_leaves(list(args)))


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
    """Apply the movement ``chain`` to the real tensor ``x``."""
    for n in chain:
        if n.target is operator.getitem:
            split = n.args[0]
            x = split.target(x, *split.args[1:], **split.kwargs)[n.args[1]]
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


@dataclass
class Heads:
    """A (B, H, S, D) tensor read head by head from channel blocks of ``source``."""

    source: torch.fx.Node  # (B, S, C) or (B, C, 1, S)
    offsets: list[int]  # first channel of each head in the source
    head_dim: int
    source_is_bc1s: bool


def trace_heads(node: torch.fx.Node) -> Heads | None:
    out = shape(node)
    if out is None or len(out) != 4:
        return None
    mapped = index_map(node)
    if mapped is None:
        return None
    return heads_from_index(*mapped)


def heads_from_index(src: torch.fx.Node, r: torch.Tensor) -> Heads | None:
    """``r`` (B, H, S, D) indexes the flattened ``src``: the heads it reads when each head is a channel
    block of ``src`` (B, S, C) or (B, C, 1, S), else None."""
    src_shape = shape(src)
    bc = _index_in_bc1s(src_shape) if src_shape is not None else None
    if bc is None or r.dim() != 4:
        return None
    b, h, s, d = r.shape
    if bc.shape[0] != b or bc.shape[3] != s:
        return None
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
    return Heads(src, offsets, d, len(src_shape) == 4)


def trace_merge(node: torch.fx.Node, heads_node: torch.fx.Node) -> bool:
    """Whether ``node`` (B, S, H*D) is ``heads_node`` (B, H, S, D) with heads concatenated in order."""
    hs, out = shape(heads_node), shape(node)
    if hs is None or out is None or len(out) != 3:
        return False
    mapped = index_map(node)
    if mapped is None or mapped[0] is not heads_node:
        return False
    r = mapped[1]
    b, h, s, d = hs
    idx = torch.arange(b * h * s * d).reshape(b, h, s, d)
    return tuple(r.shape) == out and torch.equal(r, idx.transpose(1, 2).reshape(b, s, h * d))


def merge_users(heads_node: torch.fx.Node, max_depth: int = 6) -> list[torch.fx.Node]:
    """Rank-3 descendants of ``heads_node`` reached through movement ops only that merge its heads."""
    found = []
    frontier = [heads_node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op != "call_function" or u.target not in MOVEMENT:
                    continue
                if len(shape(u) or ()) == 3 and trace_merge(u, heads_node):
                    found.append(u)
                else:
                    nxt.append(u)
        frontier = nxt
    return found
