"""``attention_bc1s`` — attention as per-head einsums on the channel axis of (B, C, 1, S).

This is the structure of Apple's hand-written ``ml-ane-transformers`` attention, produced from stock
models. Two forms are recognised:

* ``aten.scaled_dot_product_attention`` (transformers' default ``sdpa``), with or without a mask,
  ``is_causal``, an explicit or implied scale, and grouped-query attention (``enable_gqa`` or
  repeated K/V heads);
* the eager form ``softmax(q @ k^T * scale + mask) @ v`` (also ``/ sqrt(d)``, masks added or
  ``masked_fill``-ed, dropout in eval).

Q, K and V must come from channel blocks of (B, S, C) (or already (B, C, 1, S)) tensors through pure
data movement (``view``/``transpose``/``permute``/``split``/``expand`` … in any spelling: checked by
simulating the reshuffle, see :mod:`anefx.analysis.heads`), or through per-head work between the head split
and attention — rotary embeddings (half-rotation, interleaved, partial), QK-norm, casts, then
``repeat_kv`` — which is replayed head by head on (B, D, 1, S) channel chunks (``rotate_half``
becomes a split + ``neg`` + ``cat`` on the channel axis; cos/sin enter as (1, D, 1, S) tensors, once
for all layers; QK-norm's RMSNorm over ``head_dim`` becomes one ``channel_layer_norm`` of ``[x, -x]``
per head chunk, as in ``rms_norm_bc1s``, counted in ``qk_norms``; interleaved rotary's strided
``x[..., ::2]``/``x[..., 1::2]`` become contiguous runs once a q/k projection of its own computes each
head's channels evens-first — its weight rows permuted at compile time, q·k unchanged by the same
permutation of both, counted in ``reordered_heads`` — and chunks whose channel orders differ are
realigned by slices and a ``cat``), see :mod:`anefx.analysis.head_program`. Masks keep torch's
semantics exactly: they are lowered by
:mod:`anefx.analysis.masks` to per-key terms applied in the model's order — fills (a
``masked_fill`` keeps its fill value; ``finfo.min``-style masks use a finite negative fp16 holds) and
additive biases; ``is_causal`` is torch's top-left ``tril``; a scale applied after a mask scales it;
rows whose keys are all masked give torch's result (see :mod:`anefx.analysis.masks`). Attention whose inputs
Per-head work merged back channels-first — how a KV cache in the ANE layout is written,
``reshape(transpose(rotary(k), 2, 3), [B, H·D, 1, S])`` — is computed the same way, head by head on
the projection's channel chunks and concatenated, so the cache write needs no layout change (counted
in ``merges``). Attention whose inputs
do not match is left alone and counted in ``unmatched`` with the reason in ``unmatched_reasons`` —
also a softmax over ``q @ k^T`` scores no matcher recognises (logit soft-capping, 3-D ``bmm``
attention).

Original::

    %q = aten.transpose(aten.view(%q_proj, [B, S, H, D]), 1, 2)       # (B, H, S, D); k, v alike
    %o = aten.scaled_dot_product_attention(%q, %k, %v, %mask, scale=s)
    %y = aten.reshape(aten.transpose(%o, 1, 2), [B, S, H*D])
Result::

    %Q = to_bc1s(%q_proj) * s ;  %K = to_bc1s(%k_proj) ;  %V = to_bc1s(%v_proj)   # (B, C, 1, S)
    %KT = aten.permute(%K, [0, 3, 2, 1])                      # the one K transpose: (B, S, 1, C)
    %q_h, %k_h, %v_h = split(%Q, D, 1)[h], split(%KT, D, 3)[h], split(%V, D, 1)[h]
    %w_h = aten.softmax(einsum("bchq,bkhc->bkhq", %q_h, %k_h).masked_fill(%drop_bc, -1e4), 1)  # (B, S_k, 1, S_q)
    %o_h = einsum("bkhq,bchk->bchq", %w_h, %v_h)                                 # (B, D, 1, S_q)
    %y = from_bc1s(aten.cat([%o_0, …, %o_{H-1}], 1))

Options:
  mask_value: the finite negative used for masked positions (default -1e4, safe in fp16)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.head_program import (
    REDUCE_OPS,
    ChannelOrder,
    HeadProgram,
    Step,
    channel_order,
    chunk_axis,
    side_index,
    trace_program,
)
from anefx.analysis.head_program import (
    D as H_D,
)
from anefx.analysis.heads import MOVEMENT, Heads, merge_users, movement_chain, simulate, trace_heads
from anefx.analysis.layout import from_bc1s, to_bc1s
from anefx.analysis.masks import NEG_INF, MaskLowering, MaskTerm, MaskUse
from anefx.analysis.norms import emit_channel_rms_norm
from anefx.ir.graph import add_constant, call, dce, describe, eval_constant, is_constant, provenance, shape, val
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_PASS = {aten.dropout.default, aten.clone.default, aten.alias.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}


@dataclass(frozen=True)
class AttentionOptions:
    mask_value: float = -1e4


@dataclass
class Core:
    """One attention computation found in the graph."""

    out: torch.fx.Node  # (B, H, S_q, D_v)
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    masks: list[MaskUse] = field(default_factory=list)  # in the order they apply to the scores
    causal: bool = False
    sdpa: bool = False  # torch's SDPA: rows whose keys are all masked give zeros


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def match_sdpa(node: torch.fx.Node) -> Core | None:
    if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p", 0.0):
        return None
    d = shape(a["query"])[-1]
    scale = a.get("scale")
    core = Core(node, a["query"], a["key"], a["value"], float(scale) if scale is not None else 1 / math.sqrt(d))
    mask = a.get("attn_mask")
    if mask is not None:
        core.masks.append(MaskUse(mask, "keep" if val(mask).dtype == torch.bool else "add"))
    core.causal = bool(a.get("is_causal", False))
    core.sdpa = True
    return core


def match_eager(node: torch.fx.Node) -> Core | None:
    """``matmul(softmax(q @ k^T * scale + mask, -1), v)``."""
    if node.op != "call_function" or node.target != aten.matmul.default:
        return None
    w, v = node.args
    while w.op == "call_function" and w.target in _PASS:
        w = w.args[0]
    if w.op != "call_function" or w.target not in _SOFTMAX or w.args[1] not in (-1, 3):
        return None
    x = w.args[0]
    masks: list[MaskUse] = []  # walked from the softmax back to the scores: reversed below
    scale = 1.0  # the product of the scalar factors met so far (applied after the masks still to come)
    while x.op == "call_function":
        if x.target == aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in x.args[:2]):
            left, right = x.args[:2]
            mask, x = (right, left) if _depends_on_matmul(left) else (left, right)
            masks.append(MaskUse(mask, "add", scale=scale))
        elif x.target == aten.masked_fill.Scalar and _scalar(x.args[2]) is not None:
            masks.append(MaskUse(x.args[1], "drop", fill=_scalar(x.args[2]), scale=scale))
            x = x.args[0]
        elif x.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(x.args[1]) is not None:
            s = _scalar(x.args[1])
            if s == 0 or (masks and s < 0):  # a negative factor after a mask would turn it into a bonus
                return None
            scale = scale * s if x.target == aten.mul.Tensor else scale / s
            x = x.args[0]
        else:
            break
    masks.reverse()
    if x.op != "call_function" or x.target != aten.matmul.default:
        return None
    q, kt = x.args
    ks = shape(kt)
    if kt.op != "call_function" or ks is None or len(ks) != 4:
        return None
    if not _swaps_last_two(kt):
        return None
    k = kt.args[0]
    if q.op == "call_function" and q.target == aten.mul.Tensor and _scalar(q.args[1]) is not None:
        scale *= _scalar(q.args[1])
        q = q.args[0]
    return Core(node, q, k, v, scale, masks)  # every factor goes into Q; masks after one carry it


def _swaps_last_two(n: torch.fx.Node) -> bool:
    if n.target == aten.transpose.int:
        return sorted(d % 4 for d in n.args[1:]) == [2, 3]
    return n.target == aten.permute.default and [d % 4 for d in n.args[1]] == [0, 1, 3, 2]


def _depends_on_matmul(n: torch.fx.Node, depth: int = 4) -> bool:
    for _ in range(depth):
        if n.op != "call_function":
            return False
        if n.target == aten.matmul.default:
            return True
        n = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else n
    return False


def _causal_term(gm: torch.fx.GraphModule, graph, sq: int, sk: int, before) -> MaskTerm:
    """``is_causal``: torch's ``tril`` over (S_q, S_k), top-left aligned — key j is visible to query
    i iff j <= i (also when S_q != S_k). As a fill mask in the scores' (1, S_k, 1, S_q) layout."""
    q = torch.arange(sq).view(1, sq)
    k = torch.arange(sk).view(sk, 1)
    name = add_constant(gm, (k > q).view(1, sk, 1, sq), "_anefx_mask")
    with graph.inserting_before(before):
        node = graph.get_attr(name)
    return MaskTerm(node, per_head=False, fill=NEG_INF)


class _Split:
    """Per-head channel blocks of a (B, C, 1, S) tensor along ``axis``: one ``split`` into blocks of
    ``size`` when the heads sit on block boundaries (also for fused QKV projections, whose q, k and
    v heads share one split), else one ``slice`` per head."""

    def __init__(self, graph, x4, axis: int, size: int, channels: int):
        self.graph, self.x4, self.axis, self.size = graph, x4, axis, size
        self.aligned = channels > 0 and channels % size == 0
        self.channels = channels
        self.split = None
        self.parts: dict[int, torch.fx.Node] = {}

    def __getitem__(self, offset: int) -> torch.fx.Node:
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


def _splitter(splits: dict, graph, x4, axis: int, size: int) -> _Split:
    key = (x4, axis, size)
    if key not in splits:
        s = shape(x4)
        splits[key] = _Split(graph, x4, axis, size, s[axis] if s else 0)
    return splits[key]


class AttentionBC1S(Pass):
    __doc__ = __doc__
    name = "attention_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants", "linear_to_conv"})
    Options = AttentionOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats = {"rewritten": 0, "heads": 0, "unmatched": 0}
        reasons: dict[str, int] = {}
        memo: dict = {}
        lowering: dict = {}
        sides: dict = {}
        seen: set[torch.fx.Node] = set()
        original = list(graph.nodes)  # the rewrite adds per-head softmaxes: only these are candidates
        for node in original:  # in graph order: what a site creates is reused only by later sites
            core = match_sdpa(node) or match_eager(node)
            if core is None:
                if self._merge(gm, node, ctx, memo, sides, seen):
                    stats["merges"] = stats.get("merges", 0) + 1
                continue
            seen.add(core.out)
            traced = _trace_inputs(core)
            if isinstance(traced, str) or _blocked(core, traced):
                stats["unmatched"] += 1
                why = traced if isinstance(traced, str) else "batch, sequence or GQA ratio mismatch"
                reasons[why] = reasons.get(why, 0) + 1
                continue
            if not ctx.site(core.out):
                continue
            norms = sum(
                t.base_heads for t in traced if isinstance(t, HeadProgram) for s in t.steps.values() if s.kind == "norm"
            )
            orders = [channel_order(t) if isinstance(t, HeadProgram) else None for t in traced]
            qk_free = all(isinstance(t, HeadProgram) for t in traced[:2])
            with provenance(core.out):
                with graph.inserting_before(core.out):
                    q, q_perm = self._materialise(gm, traced[0], orders[0], _FREE if qk_free else None, memo, sides)
                    k, _ = self._materialise(gm, traced[1], orders[1], q_perm, memo, sides)
                    v, _ = self._materialise(gm, traced[2], orders[2], None, memo, sides)
                self._rewrite(gm, core, q, k, v, memo, lowering)
            if q_perm is not None:
                stats["reordered_heads"] = stats.get("reordered_heads", 0) + len(q.offsets)
            stats["rewritten"] += 1
            stats["heads"] += len(q.offsets)
            if norms:
                stats["qk_norms"] = stats.get("qk_norms", 0) + norms
        for node in original:  # attention no matcher recognised: counted, never silent
            why = _unrecognised(node, seen)
            if why is not None:
                stats["unmatched"] += 1
                reasons[why] = reasons.get(why, 0) + 1
        if reasons:
            stats["unmatched_reasons"] = reasons
        changed = bool(stats["rewritten"] or stats.get("merges"))
        if changed:
            dce(graph)
        return finish(gm, changed, **stats)

    def _rewrite(self, gm, core: Core, qh: Heads, kh: Heads, vh: Heads, memo: dict, lowering: dict) -> None:
        graph = gm.graph
        b, h, sq, d = shape(core.q)
        sk, dv = shape(core.k)[2], shape(core.v)[3]
        dtype = val(core.q).dtype
        k_offsets, v_offsets = _per_query_head(kh.offsets, h), _per_query_head(vh.offsets, h)
        neg = self.options.mask_value
        low = lowering.setdefault(dtype, MaskLowering(gm, h, dtype, neg))
        low.set_insertion_point(core.out)
        terms: list[MaskTerm] = []
        for use in core.masks:
            terms += low.lower(use)
        if core.causal:
            terms.append(_causal_term(gm, graph, sq, sk, core.out))
        visible = low.visible(terms) if core.sdpa else None
        if core.sdpa:  # -inf fills become finite; rows with no visible key are zeroed below, as torch does
            terms = [MaskTerm(t.node, t.per_head, neg) if t.fill == NEG_INF else t for t in terms]
        splits: dict = {}
        with graph.inserting_before(core.out):
            q4, k4, v4 = (self._bc(graph, t, memo) for t in (qh, kh, vh))
            if core.scale != 1.0:
                q4 = call(graph, aten.mul.Tensor, (q4, core.scale))
            kt = call(graph, aten.permute.default, (k4, [0, 3, 2, 1]))  # (B, S_k, 1, C_k)
            qs = _splitter(splits, graph, q4, 1, d)
            ks = _splitter(splits, graph, kt, 3, d)
            vs = _splitter(splits, graph, v4, 1, dv)
            outs = []
            for i in range(h):
                s = call(graph, aten.einsum.default, ("bchq,bkhc->bkhq", [qs[qh.offsets[i]], ks[k_offsets[i]]]))
                for term in terms:
                    t = term.node
                    if term.per_head:
                        t = call(graph, aten.slice.Tensor, (t, 2, i, i + 1))
                    if term.fill is None:
                        s = call(graph, aten.add.Tensor, (s, t))
                    else:
                        s = call(graph, aten.masked_fill.Scalar, (s, t, term.fill))
                w = call(graph, aten._softmax.default, (s, 1, False))
                o = call(graph, aten.einsum.default, ("bkhq,bchk->bchq", [w, vs[v_offsets[i]]]))
                if visible is not None and visible.per_head:
                    o = call(graph, aten.mul.Tensor, (o, call(graph, aten.slice.Tensor, (visible.node, 2, i, i + 1))))
                outs.append(o)
            out4 = call(graph, aten.cat.default, (outs, 1)) if len(outs) > 1 else outs[0]
            if visible is not None and not visible.per_head:
                out4 = call(graph, aten.mul.Tensor, (out4, visible.node))
        merged = from_bc1s(graph, out4, 3)
        for m in merge_users(core.out):
            m.replace_all_uses_with(merged)
        if core.out.users:  # consumers that want (B, H, S_q, D_v): give it back to them
            with graph.inserting_before(core.out):
                heads = call(graph, aten.view.default, (merged, [b, sq, h, dv]))
                back = call(graph, aten.permute.default, (heads, [0, 2, 1, 3]))
            core.out.replace_all_uses_with(back)

    def _merge(self, gm, node, ctx: PassContext, memo: dict, sides: dict, seen: set) -> bool:
        """``node``, a channels-first merge of per-head work (a KV cache write), computed head by head
        on channel chunks instead: no layout change between the projection and the cache."""
        graph = gm.graph
        src = channels_first_merge(node)
        if src is None or src in seen:
            return False
        found = trace_heads(src) or trace_program(src)
        if isinstance(found, str) or not ctx.site(node):
            return False
        with provenance(node), graph.inserting_before(node):
            order = channel_order(found) if isinstance(found, HeadProgram) else None
            heads, _ = self._materialise(gm, found, order, None, memo, sides)  # None: the model's order
            merged = self._merged(graph, heads, shape(src)[1], memo)
            if len(shape(node)) == 3:
                merged = call(graph, aten.view.default, (merged, list(shape(node))))
        node.replace_all_uses_with(merged)
        seen.add(src)
        return True

    def _merged(self, graph, heads: Heads, n_heads: int, memo: dict) -> torch.fx.Node:
        """The heads concatenated on the channels of (B, H·D, 1, S): the source itself when they are
        its channels in order."""
        x4 = self._bc(graph, heads, memo)
        d = heads.head_dim
        if heads.offsets == [j * d for j in range(n_heads)] and shape(x4)[1] == n_heads * d:
            return x4
        split = _splitter({}, graph, x4, 1, d)
        return call(graph, aten.cat.default, ([split[o] for o in heads.offsets], 1))

    @staticmethod
    def _bc(graph, heads: Heads, memo: dict) -> torch.fx.Node:
        return heads.source if heads.source_is_bc1s else to_bc1s(graph, heads.source, 3, memo)

    def _materialise(
        self, gm, found: Heads | HeadProgram, order: ChannelOrder | None, align, memo: dict, sides: dict
    ) -> tuple[Heads, Perm]:
        """A per-head program replayed head by head on (B, D, 1, S) chunks, concatenated on channels.

        Chunks carry their channel order (:data:`Perm`): the leaves' source is computed in ``order``
        (the projection's weight rows permuted, when it is a conv of its own with constant
        weights), and every op keeps track of it. The result is realigned to ``align`` (an order, None for
        the model's own, or ``_FREE`` for whatever order came out); returns the heads and their order."""
        graph = gm.graph
        if isinstance(found, Heads):
            return found, None
        chunks: dict = {}
        splits: dict = {}

        block = None
        if order is not None:
            leaf_heads = next(st.heads for st in found.steps.values() if st.kind == "leaf")
            block = _permuted_projection(gm, self._bc(graph, leaf_heads, memo), order, memo)

        def leaf(step: Step, j: int) -> tuple[torch.fx.Node, Perm]:
            hd = step.heads
            if block is not None:
                span = len(order.perm)
                x = _splitter(splits, graph, block, 1, span)[j * span]
                rel = hd.offsets[0] - order.bases[0]
                return _take(graph, x, order.perm, list(range(rel, rel + hd.head_dim)))
            return _splitter(splits, graph, self._bc(graph, hd, memo), 1, hd.head_dim)[hd.offsets[j]], None

        def chunk(node: torch.fx.Node, j: int) -> tuple[torch.fx.Node, Perm]:
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
                        norm = dataclasses.replace(norm, weight=_permuted_constant(gm, norm.weight, perm, memo))
                    out = emit_channel_rms_norm(graph, x, norm, memo=sides), perm
                elif step.kind == "interleave":
                    parts = [chunk(a, j) for a in step.parts]
                    n = len(parts)
                    perm = tuple(c * n + i for i, (_, p) in enumerate(parts) for c in _full(p, _d(parts[i][0])))
                    out = call(graph, aten.cat.default, ([x for x, _ in parts], 1)), _norm_perm(perm)
                else:
                    out = _replay_ordered(graph, step, lambda a: chunk(a, j), sides)
                chunks[(node, j)] = out
            return chunks[(node, j)]

        parts = [chunk(found.base, j) for j in range(found.base_heads)]
        perms = {p for _, p in parts}
        target = align
        if align is _FREE:
            target = next(iter(perms)) if len(perms) == 1 else None
        nodes = [x if p == target else _reorder(graph, x, p, target) for x, p in parts]
        src = call(graph, aten.cat.default, (nodes, 1)) if len(nodes) > 1 else nodes[0]
        return Heads(src, [j * found.head_dim for j in found.head_map], found.head_dim, True), target


#: a chunk's channel order: channel ``c`` of the chunk holds the value's channel ``perm[c]``; None is
#: the value's own order
Perm = tuple[int, ...] | None
_FREE = object()  # realign to nothing: keep the order the program produced


def _d(node: torch.fx.Node) -> int:
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


def _gather_channels(graph, x: torch.fx.Node, idx: list[int]) -> torch.fx.Node:
    """``x[:, idx]`` as (strided) slices and one ``cat`` on the channel axis (no gather)."""
    if idx == list(range(_d(x))):
        return x
    parts = []
    for start, stop, step in _runs(idx):
        args = (x, 1, start, stop) if step == 1 else (x, 1, start, stop, step)
        parts.append(call(graph, aten.slice.Tensor, args))
    return call(graph, aten.cat.default, (parts, 1)) if len(parts) > 1 else parts[0]


def _reorder(graph, x: torch.fx.Node, have: Perm, want: Perm) -> torch.fx.Node:
    """Chunk ``x`` in channel order ``have`` brought to order ``want``."""
    n = _d(x)
    pos = {c: i for i, c in enumerate(_full(have, n))}
    return _gather_channels(graph, x, [pos[c] for c in _full(want, n)])


def _constant(gm, value: torch.Tensor, prefix: str, like: torch.fx.Node) -> torch.fx.Node:
    """A new constant (``get_attr``) with shape metadata in ``like``'s fake mode."""
    from torch._guards import detect_fake_mode

    value = value.detach().contiguous()
    node = gm.graph.get_attr(add_constant(gm, value, prefix))
    mode = detect_fake_mode([val(like)])
    node.meta["val"] = mode.from_tensor(value) if mode is not None else value
    return node


def _permuted_constant(gm, node: torch.fx.Node, perm: tuple[int, ...], memo: dict) -> torch.fx.Node:
    """A constant ``node`` of shape (D,) in channel order ``perm`` (computed now, stored once)."""
    key = ("permuted", node, perm)
    if key not in memo:
        memo[key] = _constant(gm, eval_constant(gm, node)[list(perm)], "_anefx_perm", node)
    return memo[key]


def _permuted_projection(gm, src: torch.fx.Node, order: ChannelOrder, memo: dict):
    """``src`` with each head's channels in ``order``, computed by a conv of its own whose weight (and
    bias) rows are permuted at compile time: head ``j``'s block at channels ``j·len(order.perm)``.
    None unless ``src`` is a 1x1 conv with constant weights computing these heads and nothing else
    (a fused QKV projection would have its weight stored twice)."""
    if src.op != "call_function" or src.target != aten.conv2d.default:
        return None
    x, w, *rest = src.args
    b = rest[0] if rest else None
    rows = [base + c for base in order.bases for c in order.perm]
    if sorted(rows) != list(range(_d(src))) or not is_constant(w) or (b is not None and not is_constant(b)):
        return None
    key = ("projection", src, tuple(rows))
    if key not in memo:
        graph = gm.graph
        wv = _constant(gm, eval_constant(gm, w)[rows], "_anefx_w", src)
        bv = None if b is None else _constant(gm, eval_constant(gm, b)[rows], "_anefx_b", src)
        memo[key] = call(graph, aten.conv2d.default, (x, wv, bv, *rest[1:]), dict(src.kwargs))
    return memo[key]


def _take(graph, x: torch.fx.Node, perm: Perm, wanted: list[int]) -> tuple[torch.fx.Node, Perm]:
    """Channels ``wanted`` (in the value's order) of chunk ``x`` in order ``perm``: a plain slice when
    they sit in one run, keeping the run's order; else gathered into the value's order."""
    pos = {c: i for i, c in enumerate(_full(perm, _d(x)))}
    at = [pos[c] for c in wanted]
    ordered = sorted(at)
    if len(_runs(ordered)) == 1 and at != ordered:  # a run in another order: keep that order
        return _gather_channels(graph, x, ordered), _norm_perm(tuple(at.index(p) for p in ordered))
    return _gather_channels(graph, x, at), None


def _replay_ordered(graph, step: Step, head, sides: dict) -> tuple[torch.fx.Node, Perm]:
    """``step``'s op on chunks that carry a channel order (see :func:`_replay` for the op itself)."""
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
        aligned[a] = x if same else _reorder(graph, x, p, perm)
    side_perm = perm if t not in REDUCE_OPS else None
    return _replay(graph, step, lambda a: aligned[a], sides, side_perm), perm


_SCORES = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_SCORE_STEPS = {aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.masked_fill.Scalar, aten.view.default}


def _unrecognised(node: torch.fx.Node, seen: set) -> str | None:
    """Why a softmax over ``q @ k^T`` scores that feeds a matmul was not matched, or None when
    ``node`` is no such softmax (or belongs to an attention already counted, in ``seen``)."""
    if node.op != "call_function" or node.target not in _SOFTMAX or len(shape(node) or ()) < 3:
        return None
    users, frontier = [], list(node.users)
    for _ in range(4):  # through dropout, clones and casts (softmax(…).to(v.dtype) then dropout)
        users += frontier
        frontier = [v for u in frontier if u.op == "call_function" and u.target in _PASS | _CASTS for v in u.users]
    if not any(u.op == "call_function" and u.target in _SCORES for u in users) or any(u in seen for u in users):
        return None
    x, blocker = node.args[0], None
    for _ in range(8):
        if x.op != "call_function":
            return None
        if x.target in _SCORES:
            break
        if x.target not in _SCORE_STEPS and blocker is None:
            blocker = x
        x = x.args[0] if x.args and isinstance(x.args[0], torch.fx.Node) else x
    else:
        return None
    if x.target != aten.matmul.default or len(shape(x) or ()) == 3:
        return f"{describe(x)}: attention over 3-D (B·H, S, D) bmm/baddbmm is not rewritten"
    if blocker is not None:
        return f"{describe(blocker)} between QK^T and softmax (e.g. logit soft-capping) is not rewritten"
    return f"{describe(node)}: softmax over QK^T scores in an unrecognised form"


def channels_first_merge(node: torch.fx.Node) -> torch.fx.Node | None:
    """The (B, H, S, D) head tensor that ``node`` (data movement only) merges channels-first, into
    (B, H·D, 1, S) or (B, H·D, S) with channel ``h·D + d``: how a KV cache in the ANE layout is
    written. None for anything else. Reads recorded shapes only (never infers one)."""
    if node.op != "call_function" or node.target not in MOVEMENT or not node.users:
        return None
    s = _recorded_shape(node)
    if s is None or len(s) not in (3, 4) or (len(s) == 4 and s[2] != 1):
        return None
    found = movement_chain(node)
    if found is None or not found[1]:
        return None
    src, chain = found
    hs = _recorded_shape(src)
    if hs is None or len(hs) != 4:
        return None
    b, h, sq, d = hs
    if h == 1 or (s[0], s[1], s[-1]) != (b, h * d, sq):
        return None
    idx = torch.arange(b * h * sq * d).reshape(hs)
    try:
        r = simulate(chain, idx)
    except Exception:
        return None
    return src if torch.equal(r, idx.permute(0, 1, 3, 2).reshape(s)) else None


def _recorded_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _trace_inputs(core: Core) -> list | str:
    """Q, K and V as channel blocks (:class:`Heads`) or per-head programs, or why not."""
    traced = []
    for t in (core.q, core.k, core.v):
        found = trace_heads(t)
        if found is None:
            found = trace_program(t)
            if isinstance(found, str):
                return found
        traced.append(found)
    return traced


def _replay(graph, step: Step, head, sides: dict, side_perm: Perm = None) -> torch.fx.Node:
    """``step``'s op on per-head (B, D, 1, S) chunks: ``head(operand)`` gives a head operand's chunk;
    side operands are broadcast into the chunk layout once (shared by every head and layer)."""
    n, roles = step.node, step.roles

    def arg(a):
        if not isinstance(a, torch.fx.Node):
            return a
        if a in step.head_args:
            return head(a)
        x = _side(graph, a, roles, sides)
        if side_perm is None or (shape(x) or (1, 1))[1] <= 1:
            return x
        key = ("side", x, side_perm)
        if key not in sides:
            sides[key] = _reorder(graph, x, None, side_perm)
        return sides[key]

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


def _side(graph, a: torch.fx.Node, roles: tuple[int, ...], sides: dict) -> torch.fx.Node:
    """A tensor broadcasting over heads (cos/sin, a norm weight) in the (B, D, 1, S) chunk layout."""
    key = (side_index(a), roles)
    if key not in sides:
        s = shape(a)
        x = a
        if s:
            if len(s) < 4:
                x = call(graph, aten.view.default, (a, [1] * (4 - len(s)) + list(s)))
            perm = [0] * 4
            for axis in range(4):
                perm[chunk_axis(roles, axis)] = axis
            if perm != [0, 1, 2, 3]:
                x = call(graph, aten.permute.default, (x, perm))
        sides[key] = x
    return sides[key]


def _per_query_head(offsets: list[int], heads: int) -> list[int]:
    """K/V offsets for each query head: with grouped-query attention, ``heads / len(offsets)`` query
    heads share each K/V head."""
    return [offsets[i // (heads // len(offsets))] for i in range(heads)]


def _blocked(core: Core, traced: list) -> bool:
    """Shapes anefx does not rewrite (yet): batch or sequence mismatches, odd GQA ratios."""
    q, k, v = (shape(t) for t in (core.q, core.k, core.v))
    if None in (q, k, v) or q[0] != k[0] or k[2] != v[2]:
        return True
    h = len(_heads_of(traced[0]))
    return any(h % len(_heads_of(t)) for t in traced[1:])


def _heads_of(t: Heads | HeadProgram) -> list[int]:
    return t.offsets if isinstance(t, Heads) else t.head_map
