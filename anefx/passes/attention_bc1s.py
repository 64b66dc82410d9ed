"""``attention_bc1s`` — attention as per-head einsums on the channel axis of (B, C, 1, S).

This is the structure of Apple's hand-written ``ml-ane-transformers`` attention, produced from stock
models. Three forms are recognised:

* ``aten.scaled_dot_product_attention`` (transformers' default ``sdpa``), with or without a mask,
  ``is_causal``, an explicit or implied scale, and grouped-query attention (``enable_gqa`` or
  repeated K/V heads);
* the eager form ``softmax(q @ k^T * scale + mask) @ v`` (also ``/ sqrt(d)``, masks added or
  ``masked_fill``-ed, dropout in eval, a softmax upcast to float32 and cast back);
* the same over 3-D (B·H, S, D) tensors, as fairseq, BART and older OPT write it:
  ``bmm(softmax(bmm(q, k^T) * scale + mask), v)`` or ``baddbmm(bias, q, k^T, beta, alpha)``, the
  scores possibly viewed as (B, H, S_q, S_k) to add a mask (H is read from where q's heads come from).

Logit soft-capping (Gemma 2: ``cap * tanh(scores / cap)`` between QK^T and the softmax, the mask
added after it) is element-wise: each head's score einsum gets ``tanh`` and ``* cap``, the factors
before the ``tanh`` go into Q, the masks after it keep their order.

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
in ``merges``).

``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer``/``DecoderLayer``, whose fused fast
path never reaches a ``torch.export`` graph) projects the rows of a sequence-first (S, B, C) tensor
with one packed in-projection, and its out-projection reads (S·B, C) rows. A projection (1x1 conv or
``linear`` with constant weights) whose input positions are a reshuffle of a (B, S, C) or (B, C, 1, S)
tensor's, each keeping its channel vector, holds the same values as that projection computed on the
tensor in (B, C, 1, S): the heads are read from that conv instead (the weight is shared, not copied;
a sequence-first residual stream in (S, C, 1, B) is transposed once), and an out-projection reading
the attention output's rows runs on the per-head result before it is moved back into the rows the
model expects — a movement the layout passes fold away. The key padding mask, expanded over heads
and flattened to (B·H, 1, S_k) and added to ``attn_mask`` as MHA does, becomes one (B, S_k, 1, 1)
fill plus the ``attn_mask`` terms.

Attention whose inputs do not match is left alone and counted in ``unmatched`` with the reason in
``unmatched_reasons`` — also a softmax over ``q @ k^T`` scores no matcher recognises (an op between
QK^T and the softmax with no per-head form, e.g. scores mixed across heads).

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

Original (3-D bmm attention, soft-capped)::

    %q3 = aten.reshape(aten.transpose(aten.view(%q_proj, [B, S, H, D]), 1, 2), [B*H, S, D])  # k, v alike
    %w = aten.tanh(aten.bmm(%q3, aten.transpose(%k3, 1, 2)) / cap) * cap + %mask
    %o = aten.bmm(aten.softmax(%w, -1), %v3)                                     # (B·H, S_q, D)
Result::

    %Q = to_bc1s(%q_proj) * (1 / cap)     # per head h, as above, with the cap between einsum and mask:
    %w_h = aten.softmax(aten.tanh(einsum("bchq,bkhc->bkhq", %q_h, %k_h)) * cap + %mask_bc, 1)

Original (nn.MultiheadAttention, batch_first, packed in-projection)::

    %p = aten.conv2d(to_bc1s(aten.transpose(%x, 0, 1)), %w_in, %b_in)      # (S, 3C, 1, B): rows (s, b)
    %q = aten.view(aten.select(unflatten(from_bc1s(%p)), 0, 0), [B, H, S, D])  # k, v alike
    %r = aten.reshape(aten.permute(aten.scaled_dot_product_attention(%q, %k, %v, %m), [2, 0, 1, 3]), [S*B, C])
    %y = aten.conv2d(%r[:, :, None, None], %w_out, %b_out)                     # (S·B, C, 1, 1)
Result::

    %P = aten.conv2d(to_bc1s(%x), %w_in, %b_in)                               # (B, 3C, 1, S)
    %O = cat(per-head attention over split(%P, D, 1), 1)                       # (B, C, 1, S)
    %y = aten.reshape(aten.permute(aten.conv2d(%O, %w_out, %b_out), [3, 0, 1, 2]), [S*B, C, 1, 1])

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
from anefx.analysis.heads import (
    MOVEMENT,
    Heads,
    index_map,
    lifted_projection,
    merge_users,
    movement_chain,
    simulate,
    trace_heads,
)
from anefx.analysis.layout import from_bc1s, to_bc1s
from anefx.analysis.masks import NEG_INF, MaskLowering, MaskTerm, MaskUse
from anefx.analysis.norms import emit_channel_rms_norm
from anefx.ir.graph import (
    add_constant,
    call,
    dce,
    describe,
    dtype,
    eval_constant,
    is_constant,
    provenance,
    shape,
    val,
)
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
    heads: int | None = None  # q, k, v and out are 3-D (B·H, S, D) with this H (``bmm`` attention)
    softcap: float | None = None  # scores = tanh(q·k · scale) · softcap, then the masks (logit soft-capping)

    def shape4(self, t: torch.fx.Node) -> tuple[int, ...] | None:
        """``t``'s shape as (B, H, S, D) (3-D ``bmm`` operands split into B and H)."""
        s = shape(t)
        if self.heads is None or s is None or len(s) != 3:
            return s
        return (s[0] // self.heads, self.heads, s[1], s[2])


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
    found = _scores(node, 4)
    if found is None:
        return None
    x, v, masks, scale, softcap = found
    if x.target != aten.matmul.default:
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
    return Core(node, q, k, v, scale, masks, softcap=softcap)  # every factor goes into Q; masks after one carry it


def match_bmm(node: torch.fx.Node) -> Core | None:
    """``bmm(softmax(bmm(q, k^T) * scale + mask, -1), v)`` over 3-D (B·H, S, D) tensors (fairseq,
    BART, older OPT), also ``baddbmm(mask, q, k^T, beta, alpha)``; the scores may be viewed as
    (B, H, S_q, S_k) to add a mask and back. H is read from where q's heads come from."""
    if node.op != "call_function" or node.target != aten.bmm.default:
        return None
    found = _scores(node, 3)
    if found is None:
        return None
    x, v, masks, scale, softcap = found
    if x.target == aten.baddbmm.default:
        names = ["input", "batch1", "batch2", "beta", "alpha"]
        a = dict(zip(names, x.args))
        a.update(x.kwargs)
        beta, alpha = _scalar(a.get("beta", 1)), _scalar(a.get("alpha", 1))
        if beta is None or alpha is None or not isinstance(a["input"], torch.fx.Node):
            return None
        if beta != 0:
            masks.insert(0, MaskUse(a["input"], "add", scale=scale * beta))
        scale *= alpha
        q, kt = a["batch1"], a["batch2"]
    elif x.target == aten.bmm.default:
        q, kt = x.args
    else:
        return None
    if kt.op != "call_function" or len(shape(kt) or ()) != 3:
        return None
    swaps = (kt.target == aten.transpose.int and sorted(d % 3 for d in kt.args[1:]) == [1, 2]) or (
        kt.target == aten.permute.default and [d % 3 for d in kt.args[1]] == [0, 2, 1]
    )
    if not swaps:
        return None
    k = kt.args[0]
    if q.op == "call_function" and q.target == aten.mul.Tensor and _scalar(q.args[1]) is not None:
        scale *= _scalar(q.args[1])
        q = q.args[0]
    h = _bmm_heads(q)
    if h is None or any(len(shape(t) or ()) != 3 or shape(t)[0] != shape(q)[0] for t in (k, v)):
        return None
    for m in masks:  # a mask over the (B·H, S_q, S_k) scores: per (batch, head), or broadcast
        ms = shape(m.node)
        if ms is None or (len(ms) == 3 and ms[0] not in (1, shape(q)[0])):
            return None
    return Core(node, q, k, v, scale, masks, heads=h, softcap=softcap)


def _bmm_heads(q: torch.fx.Node) -> int | None:
    """H for a (B·H, S, D) query: B is the batch of the (B, S, C) or (B, C, 1, S) tensor its heads
    are read from."""
    mapped = index_map(q)
    qs = shape(q)
    if mapped is None or qs is None or len(qs) != 3:
        return None
    src = shape(mapped[0])
    if src is None or len(src) not in (3, 4) or src[0] == 0 or qs[0] % src[0]:
        return None
    return qs[0] // src[0]


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _scores(node: torch.fx.Node, rank: int):
    """For the value product ``node`` (rank ``rank``): the scores product feeding its softmax, the
    value operand, the masks (in the model's order) and the scale after the scores, or None."""
    w, v = node.args
    while w.op == "call_function" and (w.target in _PASS or _float_cast(w)):
        w = w.args[0]
    if w.op != "call_function" or w.target not in _SOFTMAX or w.args[1] not in (-1, rank - 1):
        return None
    x = w.args[0]
    while _float_cast(x):  # softmax(x.float()).to(dtype): computed in the scores' own dtype
        x = x.args[0]
    masks: list[MaskUse] = []  # walked from the softmax back to the scores: reversed below
    scale = 1.0  # the product of the scalar factors met so far (applied after the masks still to come)
    softcap = None  # the factors after a tanh (soft-capping): the factors met later go into q
    while x.op == "call_function":
        if softcap is not None and x.target in (aten.add.Tensor, aten.masked_fill.Scalar):
            return None  # a mask before the cap is squashed by the tanh: not a mask any more
        if x.target == aten.tanh.default and softcap is None:
            softcap, scale = scale, 1.0
            x = x.args[0]
        elif x.target == aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in x.args[:2]):
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
        elif rank == 3 and x.target in _VIEWS and _regroups_heads(x):
            x = x.args[0]
        else:
            break
    masks.reverse()
    if x.op != "call_function" or x.target not in _PRODUCTS:
        return None
    return x, v, masks, scale, softcap


def _float_cast(n: torch.fx.Node) -> bool:
    """A cast between floating dtypes (the softmax upcast and the cast back)."""
    if n.op != "call_function" or n.target not in _CASTS or not isinstance(n.args[0], torch.fx.Node):
        return False
    src, out = dtype(n.args[0]), dtype(n)
    return src is not None and out is not None and src.is_floating_point and out.is_floating_point


_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}


def _regroups_heads(n: torch.fx.Node) -> bool:
    """A view between (B·H, S_q, S_k) and (B, H, S_q, S_k) scores (the element order is kept)."""
    a, b = shape(n.args[0]), shape(n)
    if a is None or b is None or {len(a), len(b)} != {3, 4}:
        return False
    three, four = (a, b) if len(a) == 3 else (b, a)
    return three == (four[0] * four[1], four[2], four[3])


def _swaps_last_two(n: torch.fx.Node) -> bool:
    if n.target == aten.transpose.int:
        return sorted(d % 4 for d in n.args[1:]) == [2, 3]
    return n.target == aten.permute.default and [d % 4 for d in n.args[1]] == [0, 1, 3, 2]


def _depends_on_matmul(n: torch.fx.Node, depth: int = 6) -> bool:
    for _ in range(depth):
        if n.op != "call_function":
            return False
        if n.target in _PRODUCTS:
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
            core = match_sdpa(node) or match_eager(node) or match_bmm(node)
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
        b, h, sq, d = core.shape4(core.q)
        sk, dv = core.shape4(core.k)[2], core.shape4(core.v)[3]
        dtype = val(core.q).dtype
        k_offsets, v_offsets = _per_query_head(kh.offsets, h), _per_query_head(vh.offsets, h)
        neg = self.options.mask_value
        low = lowering.setdefault(dtype, MaskLowering(gm, h, dtype, neg))
        low.set_insertion_point(core.out)
        terms: list[MaskTerm] = []
        for use in core.masks:
            ms = shape(use.node)
            if core.heads is not None and len(ms) == 3 and ms[0] == b * h > 1:  # (B·H, ·, ·) as (B, H, ·, ·)
                with graph.inserting_before(core.out):
                    use = dataclasses.replace(use, node=call(graph, aten.view.default, (use.node, [b, h, *ms[1:]])))
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
                if core.softcap is not None:  # element-wise: the same on each head's scores
                    s = call(graph, aten.tanh.default, (s,))
                    if core.softcap != 1.0:
                        s = call(graph, aten.mul.Tensor, (s, core.softcap))
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
        for m in merge_users(core.out, hs=(b, h, sq, dv)):
            m.replace_all_uses_with(merged)
        if core.out.users:  # consumers that want (B, H, S_q, D_v): give it back to them
            with graph.inserting_before(core.out):
                heads = call(graph, aten.view.default, (merged, [b, sq, h, dv]))
                back = call(graph, aten.permute.default, (heads, [0, 2, 1, 3]))
                if core.heads is not None:  # bmm attention: (B·H, S_q, D_v)
                    back = call(graph, aten.reshape.default, (back, [b * h, sq, dv]))
            core.out.replace_all_uses_with(back)
            _lift_output_projections(graph, back, out4, memo)

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
        if heads.lift is not None:  # the projection computed on the (B, C, 1, S) tensor it reads rows of
            return _lifted_conv(graph, heads.lift.conv, heads.lift.x, memo, heads.lift.swap)
        if heads.by_position:  # (B, S, 1, C): one transpose, cancelled by the K transpose that follows
            key = ("by_position", heads.source)
            if key not in memo:
                memo[key] = call(graph, aten.permute.default, (heads.source, [0, 3, 2, 1]))
            return memo[key]
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
    from anefx.compat.torch import detect_fake_mode

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
        if not x.all_input_nodes:
            return None
        x = x.all_input_nodes[0]
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


def _lift_output_projections(graph, back: torch.fx.Node, out4: torch.fx.Node, memo: dict) -> None:
    """1x1 convs reading rows of the attention output ``back`` through data movement only
    (``nn.MultiheadAttention``'s out-projection of the (S·B, C) rows) run on ``out4`` (B, C, 1, S)
    instead; their result is moved back into the rows the model expects, a movement the layout
    passes then fold away against the model's own way back to (B, S, C)."""
    frontier, convs = [back], []
    for _ in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "call_function" and u.target in _PROJECTIONS and u.args[0] is n:
                    convs.append(u)
                elif u.op == "call_function" and u.target in MOVEMENT:
                    nxt.append(u)
        frontier = nxt
    for conv in convs:
        found = lifted_projection(conv)
        if found is None or found[0].x is not out4:
            continue
        with graph.inserting_before(conv), provenance(conv):
            z = _lifted_conv(graph, conv, out4, memo)
            rows = _positions(graph, z, found[1], found[2], shape(conv))
        if rows is not None:
            conv.replace_all_uses_with(rows)


def _positions(graph, z: torch.fx.Node, zidx: torch.Tensor, zshape, out_shape) -> torch.fx.Node | None:
    """``z`` (``zshape``) moved so that element ``i`` of the result (``out_shape``) is element
    ``zidx[i]`` of ``z``: one ``permute`` and one ``reshape``, or None when no such pair does it."""
    import itertools

    idx = torch.arange(zidx.numel()).reshape(zshape)
    for perm in itertools.permutations(range(4)):
        if torch.equal(idx.permute(perm).reshape(out_shape), zidx):
            x = z if list(perm) == [0, 1, 2, 3] else call(graph, aten.permute.default, (z, list(perm)))
            return call(graph, aten.reshape.default, (x, list(out_shape)))
    return None


def _lifted_conv(graph, conv: torch.fx.Node, x: torch.fx.Node, memo: dict, swap: bool = False) -> torch.fx.Node:
    """``conv`` (a 1x1 conv or a ``linear``) computed on ``x`` ((B, S, C) or (B, C, 1, S)) in (B, C, 1, S);
    ``swap``: ``x`` is sequence-first, its first and last axes of (B, C, 1, S) are swapped first."""
    key = ("lift", conv, x, swap)
    if key not in memo:
        x4 = x if len(shape(x)) == 4 else to_bc1s(graph, x, 3, memo)
        if swap:
            x4 = call(graph, aten.permute.default, (x4, [3, 1, 2, 0]))
        if conv.target == aten.linear.default:
            w = conv.args[1]
            w4 = call(graph, aten.view.default, (w, [*shape(w), 1, 1]))  # a view of the weight: no copy
            memo[key] = call(graph, aten.conv2d.default, (x4, w4, *conv.args[2:3]))
        else:
            memo[key] = call(graph, aten.conv2d.default, (x4, *conv.args[1:]))
    return memo[key]


_PROJECTIONS = {aten.conv2d.default, aten.linear.default}


def _recorded_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _trace_inputs(core: Core) -> list | str:
    """Q, K and V as channel blocks (:class:`Heads`) or per-head programs, or why not."""
    traced = []
    for t in (core.q, core.k, core.v):
        found = trace_heads(t, core.heads)
        if found is None and core.heads is not None:
            return f"{describe(t)}: (B·H, S, D) bmm attention whose heads are not channel blocks of a projection"
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
    q, k, v = (core.shape4(t) for t in (core.q, core.k, core.v))
    if None in (q, k, v) or q[0] != k[0] or k[2] != v[2]:
        return True
    h = len(_heads_of(traced[0]))
    return any(h % len(_heads_of(t)) for t in traced[1:])


def _heads_of(t: Heads | HeadProgram) -> list[int]:
    return t.offsets if isinstance(t, Heads) else t.head_map
