"""Per-head work replayed on (B, D, 1, S) channel chunks: what the attention and cache-write passes emit.

Both passes need a head tensor as channel chunks of a (B, C, 1, S) tensor: heads that are channel
blocks of a projection (:class:`~anefx.analysis.heads.Heads`, split on the channel axis), or a
per-head program (:class:`~anefx.analysis.head_program.HeadProgram`: rotary, QK-norm, casts,
``repeat_kv``) replayed head by head on those chunks and concatenated. :class:`HeadReplay` does
that, once per pass run, sharing what sites have in common (layout changes, cos/sin tables in
chunk layout, permuted projections) through typed memo tables.

Chunks carry their channel order (:data:`Perm`): interleaved rotary is replayed on channels
ordered evens-first (the projection's weight rows permuted at compile time, see
:func:`anefx.analysis.head_program.channel_order`), and chunks whose orders differ are realigned
by slices and a ``cat``. Tables broadcast over heads (cos/sin, norm weights) are put in the chunk
layout once; a table another pass already put there (before the site) is reused, so two passes
replaying the same rotary emit it once.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.head_program import REDUCE_OPS, ChannelOrder, HeadProgram, Step, chunk_axis, side_index
from anefx.analysis.head_program import D as H_D
from anefx.analysis.heads import Heads
from anefx.analysis.layout import to_bc1s
from anefx.analysis.norms import LayerNorm, emit_channel_rms_norm
from anefx.compat.torch import detect_fake_mode
from anefx.ir.graph import add_constant, call, eval_constant, is_constant, shape, val, walk_args

aten = torch.ops.aten
Node = torch.fx.Node

#: a chunk's channel order: channel ``c`` of the chunk holds the value's channel ``perm[c]``; None is
#: the value's own order
Perm = tuple[int, ...] | None
#: ``align`` for :meth:`HeadReplay.materialise`: keep the order the program produced
FREE = object()


def _d(node: Node) -> int:
    return shape(node)[1]


def _full(perm: Perm, n: int) -> tuple[int, ...]:
    return tuple(range(n)) if perm is None else perm


def _norm_perm(perm: tuple[int, ...]) -> Perm:
    return None if perm == tuple(range(len(perm))) else perm


def _runs(idx: list[int]) -> list[tuple[int, int, int]]:
    """``idx`` as runs ``(start, stop, step)`` of arithmetic progressions with a positive step."""
    runs, i = [], 0
    while i < len(idx):
        step = idx[i + 1] - idx[i] if i + 1 < len(idx) and idx[i + 1] > idx[i] else 1
        j = i + 1
        while j < len(idx) and idx[j] - idx[j - 1] == step:
            j += 1
        runs.append((idx[i], idx[j - 1] + 1, step))
        i = j
    return runs


def shared_call(graph: torch.fx.Graph, target, args: tuple, before: Node | None) -> Node:
    """``call(graph, target, args)``, or the node that already computes it before ``before`` (a
    table put in chunk layout by an earlier site or pass)."""
    if before is not None:
        first = next(walk_args(args), None)
        for u in first.users if first is not None else ():
            if u.op == "call_function" and u.target == target and u.args == tuple(args) and not u.kwargs and u < before:
                return u
    return call(graph, target, args)


def gather_channels(graph, x: Node, idx: list[int], before: Node | None = None) -> Node:
    """``x[:, idx]`` as (strided) slices and one ``cat`` on the channel axis (no gather)."""
    if idx == list(range(_d(x))):
        return x
    parts = []
    for start, stop, step in _runs(idx):
        args = (x, 1, start, stop) if step == 1 else (x, 1, start, stop, step)
        parts.append(shared_call(graph, aten.slice.Tensor, args, before))
    return shared_call(graph, aten.cat.default, (parts, 1), before) if len(parts) > 1 else parts[0]


def reorder(graph, x: Node, have: Perm, want: Perm, before: Node | None = None) -> Node:
    """Chunk ``x`` in channel order ``have`` brought to order ``want``."""
    n = _d(x)
    pos = {c: i for i, c in enumerate(_full(have, n))}
    return gather_channels(graph, x, [pos[c] for c in _full(want, n)], before)


def _take(graph, x: Node, perm: Perm, wanted: list[int]) -> tuple[Node, Perm]:
    """Channels ``wanted`` (in the value's order) of chunk ``x`` in order ``perm``: a plain slice when
    they sit in one run, keeping the run's order; else gathered into the value's order."""
    pos = {c: i for i, c in enumerate(_full(perm, _d(x)))}
    at = [pos[c] for c in wanted]
    ordered = sorted(at)
    if len(_runs(ordered)) == 1 and at != ordered:  # a run in another order: keep that order
        return gather_channels(graph, x, ordered), _norm_perm(tuple(at.index(p) for p in ordered))
    return gather_channels(graph, x, at), None


def constant(gm, value: torch.Tensor, prefix: str, like: Node) -> Node:
    """A new constant (``get_attr``) with shape metadata in ``like``'s fake mode."""
    value = value.detach().contiguous()
    node = gm.graph.get_attr(add_constant(gm, value, prefix))
    mode = detect_fake_mode([val(like)])
    node.meta["val"] = mode.from_tensor(value) if mode is not None else value
    return node


class Split:
    """Per-head channel blocks of a (B, C, 1, S) tensor along ``axis``: one ``split`` into blocks of
    ``size`` when the heads sit on block boundaries (also for fused QKV projections, whose q, k and
    v heads share one split), else one ``slice`` per head."""

    def __init__(self, graph, x4: Node, axis: int, size: int):
        s = shape(x4)
        self.graph, self.x4, self.axis, self.size = graph, x4, axis, size
        self.channels = s[axis] if s else 0
        self.aligned = self.channels > 0 and self.channels % size == 0
        self.split: Node | None = None
        self.parts: dict[int, Node] = {}

    def __getitem__(self, offset: int) -> Node:
        if offset in self.parts:
            return self.parts[offset]
        if self.aligned and offset % self.size == 0:
            if self.channels == self.size:
                part = self.x4
            else:
                if self.split is None:
                    self.split = call(self.graph, aten.split.Tensor, (self.x4, self.size, self.axis))
                part = call(self.graph, operator.getitem, (self.split, offset // self.size))
        else:
            part = call(self.graph, aten.slice.Tensor, (self.x4, self.axis, offset, offset + self.size))
        self.parts[offset] = part
        return part


@dataclass
class Splits:
    """The :class:`Split` of each (tensor, axis, block size), made once (per site)."""

    graph: torch.fx.Graph
    made: dict[tuple[Node, int, int], Split] = field(default_factory=dict)

    def __call__(self, x4: Node, axis: int, size: int) -> Split:
        key = (x4, axis, size)
        if key not in self.made:
            self.made[key] = Split(self.graph, x4, axis, size)
        return self.made[key]


@dataclass
class HeadReplay:
    """Emits head tensors as (B, D, 1, S) chunks of (B, C, 1, S) tensors into ``gm``; one per pass
    run, its tables shared by every site of the run."""

    gm: torch.fx.GraphModule
    #: layout changes into (B, C, 1, S), per tensor (:func:`anefx.analysis.layout.to_bc1s`'s memo)
    layout: dict[Node, Node] = field(default_factory=dict)
    #: a projection computed on the (B, C, 1, S) tensor it reads rows of: (projection, tensor, swap)
    lifted: dict[tuple[Node, Node, bool], Node] = field(default_factory=dict)
    #: a projection with each head's weight rows permuted: (projection, rows)
    permuted_projections: dict[tuple[Node, tuple[int, ...]], Node] = field(default_factory=dict)
    #: a (D,) constant (a norm weight) in a channel order: (constant, perm)
    permuted_constants: dict[tuple[Node, tuple[int, ...]], Node] = field(default_factory=dict)
    #: a table broadcast over heads in chunk layout: (its value up to data movement, axis roles)
    sides: dict[tuple, Node] = field(default_factory=dict)
    #: a side table in a channel order: (side, perm)
    reordered_sides: dict[tuple[Node, tuple[int, ...]], Node] = field(default_factory=dict)
    #: what ``emit_channel_rms_norm`` shares (the doubled norm weights)
    norm_weights: dict = field(default_factory=dict)
    #: a (B, S, 1, C) source (keys stored by position) made (B, C, 1, S)
    by_position: dict[Node, Node] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def bc(self, heads: Heads) -> Node:
        """The (B, C, 1, S) tensor whose channel blocks ``heads`` are."""
        if heads.lift is not None:  # the projection computed on the (B, C, 1, S) tensor it reads rows of
            return self.lifted_conv(heads.lift.conv, heads.lift.x, heads.lift.swap)
        if heads.by_position:  # (B, S, 1, C): one transpose, cancelled by the K transpose that follows
            if heads.source not in self.by_position:
                self.by_position[heads.source] = call(self.graph, aten.permute.default, (heads.source, [0, 3, 2, 1]))
            return self.by_position[heads.source]
        return heads.source if heads.source_is_bc1s else to_bc1s(self.graph, heads.source, 3, self.layout)

    def lifted_conv(self, conv: Node, x: Node, swap: bool = False) -> Node:
        """``conv`` (a 1x1 conv or a ``linear``) computed on ``x`` ((B, S, C) or (B, C, 1, S)) in
        (B, C, 1, S); ``swap``: ``x`` is sequence-first, its first and last axes of (B, C, 1, S) are
        swapped first."""
        key = (conv, x, swap)
        if key not in self.lifted:
            graph = self.graph
            x4 = x if len(shape(x)) == 4 else to_bc1s(graph, x, 3, self.layout)
            if swap:
                x4 = call(graph, aten.permute.default, (x4, [3, 1, 2, 0]))
            if conv.target == aten.linear.default:
                w = conv.args[1]
                w4 = call(graph, aten.view.default, (w, [*shape(w), 1, 1]))  # a view of the weight: no copy
                self.lifted[key] = call(graph, aten.conv2d.default, (x4, w4, *conv.args[2:3]))
            else:
                self.lifted[key] = call(graph, aten.conv2d.default, (x4, *conv.args[1:]))
        return self.lifted[key]

    def merged(self, heads: Heads, n_heads: int) -> Node:
        """The heads concatenated on the channels of (B, H·D, 1, S): the source itself when they are
        its channels in order."""
        x4 = self.bc(heads)
        d = heads.head_dim
        if heads.offsets == [j * d for j in range(n_heads)] and shape(x4)[1] == n_heads * d:
            return x4
        split = Split(self.graph, x4, 1, d)
        return call(self.graph, aten.cat.default, ([split[o] for o in heads.offsets], 1))

    # -- per-head programs ----------------------------------------------------------------------
    def materialise(
        self, found: Heads | HeadProgram, order: ChannelOrder | None, align, before: Node
    ) -> tuple[Heads, Perm]:
        """A per-head program replayed head by head on (B, D, 1, S) chunks, concatenated on channels
        (inserted at the current insertion point, which is before ``before``).

        The leaves' source is computed in ``order`` (the projection's weight rows permuted, when it
        is a conv of its own with constant weights), and every op keeps track of the order. The result
        is realigned to ``align`` (an order, None for the model's own, or :data:`FREE` for whatever
        order came out); returns the heads and their order. Channel blocks are returned as they are."""
        graph = self.graph
        if isinstance(found, Heads):
            return found, None
        chunks: dict[tuple[Node, int], tuple[Node, Perm]] = {}
        splits = Splits(graph)
        block = None
        if order is not None:
            leaf_heads = next(st.heads for st in found.steps.values() if st.kind == "leaf")
            block = self._permuted_projection(self.bc(leaf_heads), order)

        def leaf(step: Step, j: int) -> tuple[Node, Perm]:
            hd = step.heads
            if block is not None:
                span = len(order.perm)
                x = splits(block, 1, span)[j * span]
                rel = hd.offsets[0] - order.bases[0]
                return _take(graph, x, order.perm, list(range(rel, rel + hd.head_dim)))
            return splits(self.bc(hd), 1, hd.head_dim)[hd.offsets[j]], None

        def chunk(node: Node, j: int) -> tuple[Node, Perm]:
            if (node, j) not in chunks:
                step = found.steps[node]
                if step.kind == "leaf":
                    out = leaf(step, j)
                elif step.kind == "move":
                    out = chunk(node.args[0], j)
                elif step.kind == "norm":
                    x, perm = chunk(step.norm.x, j)
                    norm = step.norm
                    if perm is not None and norm.weight is not None:
                        norm = dataclasses.replace(norm, weight=self._permuted_constant(norm.weight, perm))
                    if isinstance(norm, LayerNorm):  # per-head QK LayerNorm: over the head chunk's channels
                        bias = norm.bias
                        if perm is not None and bias is not None:
                            bias = self._permuted_constant(bias, perm)
                        ln = torch.ops.anefx.channel_layer_norm.default
                        out = call(graph, ln, (x, norm.weight, bias, norm.eps)), perm
                    else:
                        out = emit_channel_rms_norm(graph, x, norm, memo=self.norm_weights), perm
                elif step.kind == "interleave":
                    parts = [chunk(a, j) for a in step.parts]
                    n = len(parts)
                    perm = tuple(c * n + i for i, (_, p) in enumerate(parts) for c in _full(p, _d(parts[i][0])))
                    out = call(graph, aten.cat.default, ([x for x, _ in parts], 1)), _norm_perm(perm)
                else:
                    out = self._replay_ordered(step, lambda a: chunk(a, j), before)
                chunks[(node, j)] = out
            return chunks[(node, j)]

        parts = [chunk(found.base, j) for j in range(found.base_heads)]
        perms = {p for _, p in parts}
        target = align
        if align is FREE:
            target = next(iter(perms)) if len(perms) == 1 else None
        nodes = [x if p == target else reorder(graph, x, p, target) for x, p in parts]
        src = call(graph, aten.cat.default, (nodes, 1)) if len(nodes) > 1 else nodes[0]
        return Heads(src, [j * found.head_dim for j in found.head_map], found.head_dim, True), target

    def _permuted_constant(self, node: Node, perm: tuple[int, ...]) -> Node:
        """A constant ``node`` of shape (D,) in channel order ``perm`` (computed now, stored once)."""
        key = (node, perm)
        if key not in self.permuted_constants:
            value = eval_constant(self.gm, node)[list(perm)]
            self.permuted_constants[key] = constant(self.gm, value, "_anefx_perm", node)
        return self.permuted_constants[key]

    def _permuted_projection(self, src: Node, order: ChannelOrder) -> Node | None:
        """``src`` with each head's channels in ``order``, computed by a conv of its own whose weight
        (and bias) rows are permuted at compile time: head ``j``'s block at channels ``j·len(order.perm)``.
        None unless ``src`` is a 1x1 conv with constant weights computing these heads and nothing else
        (a fused QKV projection would have its weight stored twice)."""
        if src.op != "call_function" or src.target != aten.conv2d.default:
            return None
        x, w, *rest = src.args
        b = rest[0] if rest else None
        rows = [base + c for base in order.bases for c in order.perm]
        if sorted(rows) != list(range(_d(src))) or not is_constant(w) or (b is not None and not is_constant(b)):
            return None
        key = (src, tuple(rows))
        if key not in self.permuted_projections:
            wv = constant(self.gm, eval_constant(self.gm, w)[rows], "_anefx_w", src)
            bv = None if b is None else constant(self.gm, eval_constant(self.gm, b)[rows], "_anefx_b", src)
            conv = call(self.graph, aten.conv2d.default, (x, wv, bv, *rest[1:]), dict(src.kwargs))
            self.permuted_projections[key] = conv
        return self.permuted_projections[key]

    def _replay_ordered(self, step: Step, head, before: Node) -> tuple[Node, Perm]:
        """``step``'s op on chunks that carry a channel order (see :meth:`_replay` for the op itself)."""
        graph = self.graph
        n, roles = step.node, step.roles
        t = n.target
        d_axis = roles.index(H_D)
        if t == aten.slice.Tensor and roles[n.args[1] % 4] == H_D:
            x, perm = head(n.args[0])
            start, end, stride = (*n.args[2:5], None, None, None)[:3]
            return _take(graph, x, perm, list(range(shape(n.args[0])[d_axis]))[slice(start, end, stride)])
        if t == aten.cat.default and roles[(n.args[1] if len(n.args) > 1 else 0) % 4] == H_D:
            parts = [head(a) for a in n.args[0]]
            perm, offset = [], 0
            for x, p in parts:
                perm += [offset + c for c in _full(p, _d(x))]
                offset += _d(x)
            return call(graph, aten.cat.default, ([x for x, _ in parts], 1)), _norm_perm(tuple(perm))
        size = shape(n)[d_axis]
        ops = {a: head(a) for a in n.all_input_nodes if a in step.head_args}  # in argument order
        full = [p for a, (_, p) in ops.items() if shape(a)[d_axis] == size and size > 1]
        perm = full[0] if full else None
        if t in REDUCE_OPS and any(roles[d % 4] == H_D for d in n.args[1]):
            perm = None
        aligned = {}
        for a, (x, p) in ops.items():
            same = shape(a)[d_axis] != size or size == 1 or p == perm
            aligned[a] = x if same else reorder(graph, x, p, perm)
        side_perm = perm if t not in REDUCE_OPS else None
        return self._replay(step, lambda a: aligned[a], before, side_perm), perm

    def _replay(self, step: Step, head, before: Node, side_perm: Perm = None) -> Node:
        """``step``'s op on per-head (B, D, 1, S) chunks: ``head(operand)`` gives a head operand's
        chunk; side operands are broadcast into the chunk layout once (shared by every head and layer)."""
        graph = self.graph
        n, roles = step.node, step.roles

        def arg(a):
            if not isinstance(a, Node):
                return a
            if a in step.head_args:
                return head(a)
            x = self._side(a, roles, before)
            if side_perm is None or (shape(x) or (1, 1))[1] <= 1:
                return x
            key = (x, side_perm)
            if key not in self.reordered_sides:
                self.reordered_sides[key] = reorder(graph, x, None, side_perm, before)
            return self.reordered_sides[key]

        t = n.target
        if t == aten.slice.Tensor:
            return call(graph, t, (head(n.args[0]), chunk_axis(roles, n.args[1]), *n.args[2:]))
        if t in REDUCE_OPS:
            kwargs = {k: v for k, v in n.kwargs.items() if k != "keepdim"}
            dims = [chunk_axis(roles, d) for d in n.args[1]]
            return call(graph, t, (head(n.args[0]), dims, True, *n.args[3:]), kwargs)
        if t == aten.cat.default:
            dim = n.args[1] if len(n.args) > 1 else 0
            return call(graph, t, ([arg(a) for a in n.args[0]], chunk_axis(roles, dim)))
        return call(graph, t, tuple(arg(a) for a in n.args), dict(n.kwargs))

    def _side(self, a: Node, roles: tuple[int, ...], before: Node) -> Node:
        """A tensor broadcasting over heads (cos/sin, a norm weight) in the (B, D, 1, S) chunk layout."""
        key = (side_index(a), roles)
        if key not in self.sides:
            s = shape(a)
            x = a
            if s:
                if len(s) < 4:
                    x = shared_call(self.graph, aten.view.default, (a, [1] * (4 - len(s)) + list(s)), before)
                perm = [0] * 4
                for axis in range(4):
                    perm[chunk_axis(roles, axis)] = axis
                if perm != [0, 1, 2, 3]:
                    x = shared_call(self.graph, aten.permute.default, (x, perm), before)
            self.sides[key] = x
        return self.sides[key]
