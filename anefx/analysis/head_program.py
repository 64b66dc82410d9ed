"""Per-head work between the head split and attention, replayed on (B, D, 1, S) chunks.

Decoders compute per head after splitting a projection into heads and before attention: rotary
position embeddings (``q * cos + rotate_half(q) * sin``, interleaved, partial as in GPT-NeoX),
QK-norm (Qwen3's RMSNorm over ``head_dim``), dtype casts, then ``repeat_kv`` for grouped-query
attention. :func:`trace_program` finds that work: walking up from what attention reads, every node
is either

* a *leaf*: a channel block per head of a (B, S, C) or (B, C, 1, S) tensor, through pure data
  movement (:func:`anefx.analysis.heads.heads_from_index`);
* a *move*: a ``permute``/``transpose`` of heads (the program just relabels axes);
* a *norm*: an RMSNorm over ``head_dim`` (QK-norm, spelled out as
  :func:`anefx.analysis.norms.rms_norm_ending_at` finds it, or ``aten.rms_norm``), replayed as one
  ``channel_layer_norm`` of ``[x, -x]`` per head chunk, or a LayerNorm over ``head_dim``
  (``aten.layer_norm``), replayed as one ``channel_layer_norm`` per head chunk;
* an *interleave*: ``stack([a, b, …], -1)`` flattened into ``head_dim`` (``rotate_every_two``,
  GPT-J's interleaved rotary), replayed as a ``cat`` on channels whose channel order
  :func:`channel_order` tracks;
* an *op*: elementwise work (the :mod:`anefx.analysis.layout_rules` unary/binary ops), a ``slice``/``cat``
  on the head_dim or sequence axis, or a reduction over them with ``keepdim``,
  whose other operands are either heads too or *side* tensors that broadcast over heads (cos/sin
  tables of shape (1, 1, S, D), a norm weight (D,), scalars).

Each head's chunk then lives in (B, D, 1, S): axes map B → 0, head_dim → 1, head → 2 (size 1),
sequence → 3, so the program is replayed head by head on channel chunks without leaving the ANE
layout (``rotate_half`` becomes a ``slice`` + ``neg`` + ``cat`` on the channel axis). What
attention reads is finally a movement of the program's result that picks, for each query head, one
head of it (``repeat_kv``'s ``expand`` + ``reshape``, or none): the ``head_map``.

Interleaved rotary reads ``x[..., ::2]`` and ``x[..., 1::2]``: strided channels. Since attention
scores ``q · k`` are unchanged when q and k channels are permuted alike within each head,
:func:`channel_order` picks, for each program, the order of ``head_dim`` channels that makes every
such slice a contiguous run (even channels first, then odd ones: the half-split form); the
attention pass computes the projection's channels in that order (its weight rows permuted at
compile time) and replays the program in it.

A node the program cannot replay is reported by :func:`trace_program` as the reason, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.heads import Heads, heads_from_index, index_map
from anefx.analysis.layout_rules import BINARY, UNARY
from anefx.analysis.norms import LayerNorm, RMSNorm, match_aten_rms_norm, match_layer_norm, rms_norm_ending_at
from anefx.ir.graph import describe, shape

aten = torch.ops.aten

#: canonical roles of a head tensor's axes
B, H, S, D = 0, 1, 2, 3
#: role -> axis of the per-head (B, D, 1, S) chunk
CHUNK_AXIS = (0, 2, 3, 1)
#: axis orders a head tensor is found in: (B, H, S, D) and (B, S, H, D) (QK-norm before the transpose)
ROLE_ORDERS = ((B, H, S, D), (B, S, H, D))
_MOVES = {aten.permute.default, aten.transpose.int}
REDUCE_OPS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}


@dataclass
class Step:
    node: torch.fx.Node
    kind: str  # "leaf" | "move" | "norm" | "interleave" | "op"
    roles: tuple[int, ...]  # role of each axis of ``node``
    heads: Heads | None = None  # leaf: where each head's channels are
    head_args: frozenset = frozenset()  # op: the operands that are heads (the rest are sides)
    parts: tuple = ()  # interleave: the stacked operands, in order
    norm: RMSNorm | LayerNorm | None = None  # norm: the RMSNorm or LayerNorm over head_dim, of ``norm.x``


@dataclass
class HeadProgram:
    """What attention reads (``root``, (B, H, S, D)): head ``i`` is head ``head_map[i]`` of ``base``,
    which ``steps`` compute head by head."""

    root: torch.fx.Node
    base: torch.fx.Node
    head_map: list[int]
    base_heads: int
    head_dim: int
    steps: dict[torch.fx.Node, Step] = field(default_factory=dict)

    @property
    def base_step(self) -> Step:
        return self.steps[self.base]


def chunk_axis(roles: tuple[int, ...], axis: int) -> int:
    """The (B, D, 1, S) chunk axis holding ``axis`` of a head tensor whose axes have ``roles``."""
    return CHUNK_AXIS[roles[axis % len(roles)]]


def _canonical(idx: torch.Tensor, roles: tuple[int, ...]) -> torch.Tensor:
    """``idx`` (axes with ``roles``) permuted to (B, H, S, D)."""
    return idx.permute([roles.index(r) for r in range(4)])


def _head_map(root: torch.fx.Node) -> tuple[torch.fx.Node, tuple[int, ...], list[int]]:
    """The tensor whose heads ``root`` reads, its axis roles, and which of its heads each root head is."""
    out = shape(root)
    mapped = index_map(root)
    if mapped is not None:
        src, r = mapped
        s = shape(src)
        if s is not None and len(s) == 4:
            for roles in ROLE_ORDERS:
                idx = _canonical(torch.arange(_numel(s)).reshape(s), roles)
                if (idx.shape[0], idx.shape[2], idx.shape[3]) != (out[0], out[2], out[3]):
                    continue
                heads = []
                for i in range(out[1]):
                    j = [h for h in range(idx.shape[1]) if int(idx[0, h, 0, 0]) == int(r[0, i, 0, 0])]
                    if not j or not torch.equal(idx[:, j[0]], r[:, i]):
                        break
                    heads.append(j[0])
                else:
                    return src, roles, heads
    return root, (B, H, S, D), list(range(out[1]))


def _numel(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def trace_program(root: torch.fx.Node, max_nodes: int = 64) -> HeadProgram | str:
    """The per-head program computing ``root`` (B, H, S, D), or the reason there is none."""
    out = shape(root)
    if out is None or len(out) != 4:
        return f"{describe(root)} has no static (B, H, S, D) shape"
    base, roles, head_map = _head_map(root)
    bs = shape(base)
    prog = HeadProgram(root, base, head_map, bs[roles.index(H)], out[3])
    reason = _trace(base, roles, prog, max_nodes)
    return reason if reason is not None else prog


def _trace(node: torch.fx.Node, roles: tuple[int, ...], prog: HeadProgram, budget: int) -> str | None:
    if node in prog.steps:
        return None if prog.steps[node].roles == roles else f"{describe(node)} is read in two head layouts"
    if len(prog.steps) >= budget:
        return f"more than {budget} ops between the head split and attention"
    s = shape(node)
    if s is None or len(s) != 4:
        return f"{describe(node)} between the head split and attention is not a 4-D head tensor"
    mapped = index_map(node)
    if mapped is not None:
        heads = heads_from_index(mapped[0], _canonical(mapped[1], roles))
        if heads is not None:
            prog.steps[node] = Step(node, "leaf", roles, heads=heads)
            return None
        src, src_shape = mapped[0], shape(mapped[0])
        if src_shape is not None and len(src_shape) == 3 and src_shape[:2] == (s[roles.index(S)], s[0]) != (1, 1):
            return f"{describe(node)} reads heads of a sequence-first (S, B, C) tensor (nn.MultiheadAttention)"
        rows = s[0] * s[roles.index(S)]
        if (
            src_shape is not None
            and len(src_shape) in (2, 4)
            and src_shape[0] == rows > 1
            and src_shape[2:] in ((), (1, 1))
        ):
            return (
                f"{describe(node)} reads heads of {describe(src)}, a projection of (S·B, C) rows "
                f"{list(src_shape)} (nn.MultiheadAttention's sequence-first in-projection): not rewritten"
            )
        no_leaf = f"{describe(node)} reads {describe(src)} {list(src_shape or ())} but not one channel block per head"
    else:
        no_leaf = f"{describe(node)} between the head split and attention has no per-head form"
    if node.op != "call_function":
        return f"{describe(node)}: attention inputs that are not channel blocks of a projection"
    norm = None
    if roles[3] == D:  # a norm over the last axis is over head_dim
        if node.target == aten.layer_norm.default:
            norm = match_layer_norm(node, (4,))
        elif node.target == aten.rms_norm.default:
            norm = match_aten_rms_norm(node, (4,))
        else:
            norm = rms_norm_ending_at(node, (4,))
    if norm is not None:
        reason = _trace(norm.x, roles, prog, budget)
        if reason is None:
            prog.steps[node] = Step(node, "norm", roles, head_args=frozenset({norm.x}), norm=norm)
        return reason
    parts = _interleaved(node) if roles[3] == D else None
    if parts is not None:
        for a in parts:
            reason = _trace(a, roles, prog, budget)
            if reason is not None:
                return reason
        prog.steps[node] = Step(node, "interleave", roles, head_args=frozenset(parts), parts=tuple(parts))
        return None
    t = node.target
    if t in _MOVES and isinstance(node.args[0], torch.fx.Node):
        dims = list(range(4))
        if t == aten.transpose.int:
            a, b = (d % 4 for d in node.args[1:3])
            dims[a], dims[b] = dims[b], dims[a]
        else:
            dims = [d % 4 for d in node.args[1]]
        inner = [0] * 4
        for a, d in enumerate(dims):
            inner[d] = roles[a]
        reason = _trace(node.args[0], tuple(inner), prog, budget)
        if reason is None:
            prog.steps[node] = Step(node, "move", roles)
        return reason
    h_axis = roles.index(H)
    heads_n = s[h_axis]
    if t in UNARY or t in BINARY:
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if t in UNARY:
            operands = operands[:1]
    elif t == aten.slice.Tensor or t in REDUCE_OPS:
        operands = [node.args[0]]
        if t == aten.slice.Tensor:
            dim = node.args[1] if len(node.args) > 1 else 0
            if roles[dim % 4] not in (D, S) or any(isinstance(a, torch.fx.Node) for a in node.args[2:]):
                return f"{describe(node)} slices heads"
        else:
            dims = node.args[1] if len(node.args) > 1 else None
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if not keep or dims is None or any(roles[d % 4] in (B, H) for d in dims):
                return f"{describe(node)} reduces across heads"
    elif t == aten.cat.default:
        operands = list(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else 0
        if roles[dim % 4] not in (D, S):
            return f"{describe(node)} concatenates heads"
    else:
        return no_leaf
    head_args = []
    for a in operands:
        a_shape = shape(a)
        if a_shape is None or len(a_shape) > 4:
            return f"{describe(a)} (an operand of {describe(node)}) has no static shape"
        padded = (1,) * (4 - len(a_shape)) + a_shape
        if padded[h_axis] == heads_n and len(a_shape) == 4 and (heads_n > 1 or _trace(a, roles, prog, budget) is None):
            reason = _trace(a, roles, prog, budget)
            if reason is not None:
                return reason
            head_args.append(a)
        elif padded[h_axis] != 1:
            return f"{describe(a)} (an operand of {describe(node)}) differs per head"
    if not head_args:
        return f"{describe(node)} reads no head"
    prog.steps[node] = Step(node, "op", roles, head_args=frozenset(head_args))
    return None


_FLATTENS = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FLATTENS |= {aten.reshape_as.default, aten.view_as.default}  # RoFormer: stack(...).reshape_as(x)


def _interleaved(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The operands of ``stack(operands, -1)`` when ``node`` flattens it into its last axis (4-D)."""
    if node.target not in _FLATTENS or not isinstance(node.args[0], torch.fx.Node):
        return None
    st = node.args[0]
    if st.op != "call_function" or st.target != aten.stack.default:
        return None
    dim = st.args[1] if len(st.args) > 1 else st.kwargs.get("dim", 0)
    ss, out = shape(st), shape(node)
    if ss is None or out is None or len(ss) != 5 or dim % 5 != 4:
        return None
    if out != (*ss[:3], ss[3] * ss[4]):
        return None
    parts = list(st.args[0])
    return parts if all(len(shape(a) or ()) == 4 for a in parts) else None


@dataclass
class ChannelOrder:
    """Each head's block of ``source`` channels (``bases[j]`` … ``bases[j] + len(perm)``), in the
    order ``perm``: position ``c`` of a reordered block holds channel ``bases[j] + perm[c]``."""

    source: torch.fx.Node
    bases: list[int]
    perm: tuple[int, ...]


def channel_order(prog: HeadProgram) -> ChannelOrder | None:
    """An order of each head's channels of the leaves' source in which every slice of them the
    program takes is a contiguous run, or None when the source's order is one already (or the
    leaves are not blocks of one source laid out alike for every head).

    Each step's channels are followed back to source channels where they are just source channels
    (through moves, elementwise ops and norms with matching operands, slices, cats, interleaves);
    the channels are then sorted stably by membership of the sliced sets, largest sets first. That
    is exact for nested or disjoint sets (``x[:r]``, ``x[r:]``, then ``[::2]``/``[1::2]`` of the
    first part); for anything else the attention pass realigns channels where orders differ.
    """
    leaves = [st.heads for st in prog.steps.values() if st.kind == "leaf"]
    if not leaves or len({id(h.source) for h in leaves}) != 1:
        return None
    bases = [min(h.offsets[j] for h in leaves) for j in range(len(leaves[0].offsets))]
    rel = {}
    for h in leaves:
        r = {o - b for o, b in zip(h.offsets, bases)}
        if len(h.offsets) != len(bases) or len(r) != 1:
            return None
        rel[id(h)] = r.pop()
    span = max(rel[id(h)] + h.head_dim for h in leaves)
    lmaps: dict[torch.fx.Node, tuple[int, ...] | None] = {}
    sets: list[tuple[int, ...]] = []

    def lmap(node):
        if node in lmaps:
            return lmaps[node]
        step = prog.steps[node]
        out = None
        if step.kind == "leaf":
            out = tuple(rel[id(step.heads)] + c for c in range(step.heads.head_dim))
            sets.append(out)
        elif step.kind == "move":
            out = lmap(node.args[0])
        elif step.kind == "norm":
            out = lmap(step.norm.x)
        elif step.kind == "interleave":
            maps = [lmap(a) for a in step.parts]
            if None not in maps and len({len(m) for m in maps}) == 1:
                out = tuple(m[i] for i in range(len(maps[0])) for m in maps)
        else:
            out = _op_lmap(node, step, lmap, sets)
        lmaps[node] = out
        return out

    for node in prog.steps:
        lmap(node)
    order = sorted(set(sets), key=lambda c: (-len(c), c))
    perm = tuple(sorted(range(span), key=lambda c: tuple(c not in m for m in order)))
    if perm == tuple(range(span)):
        return None
    return ChannelOrder(leaves[0].source, bases, perm)


def _op_lmap(node, step: Step, lmap, sets: list) -> tuple[int, ...] | None:
    t, roles = node.target, step.roles
    if t == aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        src = lmap(node.args[0])
        if roles[dim % 4] != D:
            return src
        if src is None:
            return None
        start, end, stride = (*node.args[2:5], None, None, None)[:3]
        out = src[slice(start, end, stride)]
        sets.append(tuple(sorted(out)))
        return out
    if t == aten.cat.default:
        dim = node.args[1] if len(node.args) > 1 else 0
        maps = [lmap(a) for a in node.args[0]]
        if roles[dim % 4] != D:
            return maps[0] if len(set(maps)) == 1 else None
        return None if None in maps else tuple(c for m in maps for c in m)
    if t in REDUCE_OPS:
        return None
    out_d = shape(node)[roles.index(D)]
    maps = {lmap(a) for a in step.head_args if shape(a)[roles.index(D)] == out_d}
    return maps.pop() if len(maps) == 1 else None


def side_index(node: torch.fx.Node):
    """A key naming the value of a side operand up to data movement, so layers share its chunk form."""
    mapped = index_map(node)
    if mapped is None:
        return node
    src, r = mapped
    return src, tuple(r.shape), r.numpy().tobytes()
