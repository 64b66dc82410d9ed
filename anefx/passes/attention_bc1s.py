"""``attention_bc1s`` — attention as per-head einsums on the channel axis of (B, C, 1, S).

This is the structure of Apple's hand-written ``ml-ane-transformers`` attention, produced from stock
models. The spellings recognised are patterns declared as data in :mod:`anefx.analysis.attention`
(counted per pattern in ``patterns``):

* ``sdpa``: ``aten.scaled_dot_product_attention`` (transformers' default), with or without a mask,
  ``is_causal``, an explicit or implied scale, and grouped-query attention (``enable_gqa`` or
  repeated K/V heads);
* ``matmul``: the eager form ``softmax(q @ k^T * scale + mask) @ v`` (also ``/ sqrt(d)``, masks added
  or ``masked_fill``-ed, dropout in eval, a softmax upcast to float32 and cast back);
* ``bmm`` and ``baddbmm``: the same over 3-D (B·H, S, D) tensors, as fairseq, BART, older OPT and
  Bloom write it: ``bmm(softmax(bmm(q, k^T) * scale + mask), v)`` or ``baddbmm(bias, q, k^T, beta,
  alpha)`` (Bloom's ALiBi biases), the scores and weights possibly viewed as (B, H, S_q, S_k) to add
  a mask (H is read from where q's heads come from).

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
rows whose keys are all masked give torch's result (see :mod:`anefx.analysis.masks`). The per-head
work a KV cache write reads is the ``cache_write_bc1s`` pass's.

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

Every attention is either rewritten or counted in ``unmatched`` with the reason in
``unmatched_reasons``: inputs that are not channel blocks of a projection, and also any softmax over
a product of two activations that feeds one (:func:`anefx.analysis.attention.attention_softmaxes`:
the softmax and the products in any spelling, ``_safe_softmax``, ``exp(x) / exp(x).sum(-1)``, a sum
over an elementwise product) that no pattern reads, e.g. scores mixed across heads.
``ANEFX_MATCH_DEBUG=<node names>`` prints what the patterns make of those nodes.

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

Attention over a KV cache kept keys-last (each K and V a (B, H_kv, D, S) tensor, positions on the
last axis, as :mod:`anefx.lm.cache` keeps it) takes another form: grouped ``matmul``s that read the
cache as it lies (no K transpose, no per-head split of the cache, the keys on the scores' last axis
so a one-token query pads nothing), counted in ``keys_last``. The choices and their sources are in
``passes_catalog/decode.md``.

Original (decode: one query, K and V read from the cache states)::

    %K = anefx.cache_write(%key_cache, %k_new, %pos, 3)                 # (1, H_kv, D, S)
    %o = aten.scaled_dot_product_attention(%q, aten.transpose(%K, 2, 3), aten.transpose(%V, 2, 3), %mask)
Result::

    %qg = aten.view(to_bc1s(%q_proj) * s, [1, H_kv, G, D])              # G = H / H_kv query heads per K/V head
    %w = aten._softmax(aten.matmul(%qg, %K).masked_fill(~%mask, -1e4), -1)   # (1, H_kv, G, S)
    %o = aten.view(aten.matmul(%w, aten.transpose(%V, 2, 3)), [1, H·D, 1, 1])  # V^T: the product's transpose_y

Options:
  mask_value: the finite negative used for masked positions (default -1e4, safe in fp16)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.attention import (
    Attention,
    KeysLast,
    NoMatch,
    Traced,
    attention_softmaxes,
    explain,
    match_attention,
    per_query_head,
    trace_cached,
    trace_inputs,
)
from anefx.analysis.head_program import HeadProgram, channel_order
from anefx.analysis.head_replay import FREE, HeadReplay, Splits, constant
from anefx.analysis.heads import MOVEMENT, Heads, lifted_projection, merge_users
from anefx.analysis.layout import from_bc1s
from anefx.analysis.masks import NEG_INF, MaskLowering, MaskTerm
from anefx.ir.graph import add_constant, call, dce, provenance, shape, val
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
Node = torch.fx.Node
_PROJECTIONS = {aten.conv2d.default, aten.linear.default}


@dataclass(frozen=True)
class AttentionOptions:
    mask_value: float = -1e4


@dataclass
class AttentionStats:
    """What one run did: attentions rewritten (per pattern), their heads, and those left alone."""

    rewritten: int = 0
    heads: int = 0
    unmatched: int = 0
    patterns: Counter[str] = field(default_factory=Counter)  # rewritten, per pattern name
    unmatched_reasons: Counter[str] = field(default_factory=Counter)
    reordered_heads: int = 0
    qk_norms: int = 0
    keys_last: int = 0  # rewritten over a keys-last KV cache (the cached form)

    def refuse(self, why: str) -> None:
        self.unmatched += 1
        self.unmatched_reasons[why] += 1

    def as_dict(self) -> dict:
        out = {"rewritten": self.rewritten, "heads": self.heads, "unmatched": self.unmatched}
        if self.patterns:
            out["patterns"] = dict(self.patterns)
        extra = (("reordered_heads", self.reordered_heads), ("qk_norms", self.qk_norms), ("keys_last", self.keys_last))
        out.update({k: v for k, v in extra if v})
        if self.unmatched_reasons:
            out["unmatched_reasons"] = dict(self.unmatched_reasons)
        return out


class AttentionBC1S(Pass):
    __doc__ = __doc__
    name = "attention_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants", "linear_to_conv"})
    Options = AttentionOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats = AttentionStats()
        replay = HeadReplay(gm)
        lowering: dict[torch.dtype, MaskLowering] = {}
        softmaxes = attention_softmaxes(graph)  # every attention, whatever its spelling
        claimed: set[Node] = set()  # the softmaxes of the attentions a pattern matched
        failed: dict[Node, NoMatch] = {}  # why a value product is no attention a pattern knows
        debug = {n.strip().lstrip("%") for n in os.environ.get("ANEFX_MATCH_DEBUG", "").split(",") if n.strip()}
        for node in list(graph.nodes):  # in graph order: what a site creates is reused only by later sites
            if node.name in debug:
                print(f"{self.name}: {explain(node)}", file=sys.stderr)
            att = match_attention(node)
            if att is None:
                continue
            if isinstance(att, NoMatch):
                failed[node] = att
                if node.target == aten.scaled_dot_product_attention.default:
                    stats.refuse(att.reason)
                continue
            claimed.add(att.softmax)
            traced = trace_inputs(att)
            cached = trace_cached(att) if isinstance(traced, NoMatch) else None
            if isinstance(traced, NoMatch) and isinstance(cached, NoMatch):
                stats.refuse(traced.reason)
                continue
            if not ctx.site(att.out):
                continue
            if cached is not None:
                self._rewrite_cached(gm, att, *cached, replay, stats)
            else:
                self._rewrite_site(gm, att, traced, replay, lowering, stats)
        for softmax, reader in softmaxes.items():  # attention no pattern matched: counted, never silent
            if softmax not in claimed:
                why = failed.get(reader.product)  # a NoMatch is false: compare with None
                stats.refuse(why.reason if why is not None else reader.why_unmatched(softmax))
        if stats.rewritten:
            dce(graph)
        return finish(gm, bool(stats.rewritten), **stats.as_dict())

    def _rewrite_site(
        self,
        gm: torch.fx.GraphModule,
        att: Attention,
        traced: Traced,
        replay: HeadReplay,
        lowering: dict[torch.dtype, MaskLowering],
        stats: AttentionStats,
    ) -> None:
        graph = gm.graph
        orders = [channel_order(t) if isinstance(t, HeadProgram) else None for t in traced]
        qk_free = all(isinstance(t, HeadProgram) for t in traced[:2])
        with provenance(att.out):
            with graph.inserting_before(att.out):
                q, q_perm = replay.materialise(traced[0], orders[0], FREE if qk_free else None, att.out)
                k, _ = replay.materialise(traced[1], orders[1], q_perm, att.out)
                v, _ = replay.materialise(traced[2], orders[2], None, att.out)
            self._rewrite(gm, att, q, k, v, replay, lowering)
        stats.rewritten += 1
        stats.heads += len(q.offsets)
        stats.patterns[att.pattern] += 1
        if q_perm is not None:
            stats.reordered_heads += len(q.offsets)
        stats.qk_norms += sum(
            t.base_heads for t in traced if isinstance(t, HeadProgram) for s in t.steps.values() if s.kind == "norm"
        )

    def _rewrite(
        self,
        gm: torch.fx.GraphModule,
        att: Attention,
        qh: Heads,
        kh: Heads,
        vh: Heads,
        replay: HeadReplay,
        lowering: dict[torch.dtype, MaskLowering],
    ) -> None:
        graph = gm.graph
        b, h, sq, d = att.shape4(att.q)
        sk, dv = att.shape4(att.k)[2], att.shape4(att.v)[3]
        dtype = val(att.q).dtype
        k_offsets, v_offsets = per_query_head(kh.offsets, h), per_query_head(vh.offsets, h)
        neg = self.options.mask_value
        low = lowering.setdefault(dtype, MaskLowering(gm, h, dtype, neg))
        low.set_insertion_point(att.out)
        terms: list[MaskTerm] = []
        for use in att.masks:
            ms = shape(use.node)
            if att.heads is not None and len(ms) == 3 and ms[0] == b * h > 1:  # (B·H, ·, ·) as (B, H, ·, ·)
                with graph.inserting_before(att.out):
                    use = dataclasses.replace(use, node=call(graph, aten.view.default, (use.node, [b, h, *ms[1:]])))
            terms += low.lower(use)
        if att.causal:
            terms.append(_causal_term(gm, sq, sk, att.out))
        visible = low.visible(terms) if att.sdpa else None
        if att.sdpa:  # -inf fills become finite; rows with no visible key are zeroed below, as torch does
            terms = [MaskTerm(t.node, t.per_head, neg) if t.fill == NEG_INF else t for t in terms]
        splits = Splits(graph)
        with graph.inserting_before(att.out):
            q4, k4, v4 = (replay.bc(t) for t in (qh, kh, vh))
            if att.scale != 1.0:
                q4 = call(graph, aten.mul.Tensor, (q4, att.scale))
            kt = call(graph, aten.permute.default, (k4, [0, 3, 2, 1]))  # (B, S_k, 1, C_k)
            qs, ks, vs = splits(q4, 1, d), splits(kt, 3, d), splits(v4, 1, dv)
            outs = []
            for i in range(h):
                s = call(graph, aten.einsum.default, ("bchq,bkhc->bkhq", [qs[qh.offsets[i]], ks[k_offsets[i]]]))
                if att.softcap is not None:  # element-wise: the same on each head's scores
                    s = call(graph, aten.tanh.default, (s,))
                    if att.softcap != 1.0:
                        s = call(graph, aten.mul.Tensor, (s, att.softcap))
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
        back = _hand_back(graph, att, out4, (b, h, sq, dv))
        if back is not None:
            _lift_output_projections(graph, back, out4, replay)

    def _rewrite_cached(
        self,
        gm: torch.fx.GraphModule,
        att: Attention,
        q_found: Heads | HeadProgram,
        k: KeysLast,
        v: KeysLast,
        replay: HeadReplay,
        stats: AttentionStats,
    ) -> None:
        """Attention over a keys-last KV cache: grouped ``matmul``s that read K and V as they lie.

        With ``G = H / H_kv`` query heads per K/V head: one query per head (decode) makes the group's
        queries the rows of one product, ``scores = q (B, H_kv, G, D) @ K (B, H_kv, D, S)`` and
        ``out = w @ V^T`` (``V`` read by the product's ``transpose_y``); T queries per head (prefill)
        add a group axis, ``scores = q^T (B, H_kv, G, T, D) @ K (B, H_kv, 1, D, S)`` and
        ``out^T = V @ w^T`` (B, H_kv, G, D_v, T), channels-first as the next projection reads it
        (without the group axis when G = 1, else without the batch axis for batch 1: 4-D). The
        keys are the scores' last axis, so a one-token query pads nothing; masks apply in the
        model's own (…, T, S) orientation."""
        graph = gm.graph
        b, h, sq, d = att.shape4(att.q)
        hkv, g, dv, sk = k.heads, h // k.heads, v.head_dim, shape(k.source)[3]
        neg = self.options.mask_value
        with provenance(att.out), graph.inserting_before(att.out):
            qh, _ = replay.materialise(q_found, None, None, att.out)  # the model's channel order, as K was cached
            q4 = replay.merged(qh, h)  # (B, H·D, 1, T)
            if att.scale != 1.0:  # every factor before the soft-cap's tanh goes into Q
                q4 = call(graph, aten.mul.Tensor, (q4, att.scale))
            if sq == 1:  # one query per head: the group's queries are the rows of one product
                qg = call(graph, aten.view.default, (q4, [b, hkv, g, d]))
                s = call(graph, aten.matmul.default, (qg, k.source))  # (B, H_kv, G, S)
            else:  # (B, H_kv, G, D, T) queries against the keys of their K/V head: (B, H_kv, G, T, S)
                # without a unit axis (G = 1: no group; batch 1): 4-D, the ANE's native rank
                drop = 2 if g == 1 else 0 if b == 1 else None
                q5 = call(graph, aten.view.default, (q4, [*_grouped((b, hkv, g), drop), d, sq]))
                qt = call(graph, aten.transpose.int, (q5, -2, -1))  # the product's transpose_x
                s = call(graph, aten.matmul.default, (qt, _grouped_cache(graph, k.source, drop)))
            if att.softcap is not None:
                s = call(graph, aten.mul.Tensor, (call(graph, aten.tanh.default, (s,)), att.softcap))
            for use in att.masks:
                ms = shape(use.node)
                if att.heads is not None and len(ms) == 3 and ms[0] == b * h > 1:  # (B·H, ·, ·) as (B, H, ·, ·)
                    use = dataclasses.replace(use, node=call(graph, aten.view.default, (use.node, [b, h, *ms[1:]])))
                s = _apply_keys_last_mask(graph, s, use, (b, h, hkv, g, sq), neg, drop if sq > 1 else None)
            if att.causal:
                hidden = (torch.arange(sk).view(1, sk) > torch.arange(sq).view(sq, 1)).view(
                    *[1] * (len(shape(s)) - 2), sq, sk
                )
                hidden = constant(gm, hidden, "_anefx_mask", s)  # torch's top-left tril
                s = call(graph, aten.masked_fill.Scalar, (s, hidden, neg))
            w = call(graph, aten._softmax.default, (s, -1, False))
            if sq == 1:
                vt = call(graph, aten.transpose.int, (v.source, 2, 3))  # the product's transpose_y
                o = call(graph, aten.matmul.default, (w, vt))  # (B, H_kv, G, D_v)
                out4 = call(graph, aten.view.default, (o, [b, h * dv, 1, 1]))
            else:  # out^T = V @ w^T: (B, H_kv, G, D_v, T), channels-first as it comes out
                wt = call(graph, aten.transpose.int, (w, -2, -1))  # the product's transpose_y
                o = call(graph, aten.matmul.default, (_grouped_cache(graph, v.source, drop), wt))
                out4 = call(graph, aten.view.default, (o, [b, h * dv, 1, sq]))
        _hand_back(graph, att, out4, (b, h, sq, dv))
        stats.rewritten += 1
        stats.heads += h
        stats.keys_last += 1
        stats.patterns[att.pattern] += 1


def _hand_back(graph, att: Attention, out4: Node, dims: tuple[int, int, int, int]) -> Node | None:
    """The attention output ``out4`` (B, H·D_v, 1, S_q) in place of ``att.out``: merges of its heads
    read it channels-last; other consumers get (B, H, S_q, D_v) (or (B·H, S_q, D_v)) back, returned."""
    b, h, sq, dv = dims
    merged = from_bc1s(graph, out4, 3)
    for m in merge_users(att.out, hs=dims):
        m.replace_all_uses_with(merged)
    if not att.out.users:
        return None
    with graph.inserting_before(att.out):
        heads = call(graph, aten.view.default, (merged, [b, sq, h, dv]))
        back = call(graph, aten.permute.default, (heads, [0, 2, 1, 3]))
        if att.heads is not None:  # bmm attention: (B·H, S_q, D_v)
            back = call(graph, aten.reshape.default, (back, [b * h, sq, dv]))
    att.out.replace_all_uses_with(back)
    return back


def _grouped(lead: tuple[int, int, int], drop: int | None) -> list[int]:
    """The (B, H_kv, G) axes of a grouped product without the unit axis ``drop`` (None: all three)."""
    return [n for i, n in enumerate(lead) if i != drop]


def _grouped_cache(graph, cache: Node, drop: int | None) -> Node:
    """A keys-last cache (B, H_kv, D, S) as the grouped product reads it: with a unit group axis,
    unless ``drop`` removes it; (H_kv, 1, D, S) for batch 1, a view that keeps the last axis."""
    b, hkv, d, sk = shape(cache)
    grouped = [*_grouped((b, hkv, 1), drop), d, sk]
    if grouped == [b, hkv, d, sk]:
        return cache
    if len(grouped) == 5:
        return call(graph, aten.unsqueeze.default, (cache, 2))
    return call(graph, aten.view.default, (cache, grouped))


def _apply_keys_last_mask(graph, s: Node, use, dims: tuple[int, ...], neg: float, drop: int | None) -> Node:
    """``use`` (a mask broadcasting against the model's (B, H, T, S) scores) applied to the grouped
    scores: (B, H_kv, G, S) for one query, else (B, H_kv, G, T, S) less the unit axis ``drop`` — a
    per-head mask viewed by group, a shared one given a unit group axis."""
    _, h, hkv, g, sq = dims
    m = use.node
    ms = list(shape(m))
    while len(ms) < 4:
        m = call(graph, aten.unsqueeze.default, (m, 0))
        ms = [1, *ms]
    if sq == 1:  # scores (B, H_kv, G, S): the mask's (T = 1) row axis is the group axis
        if ms[1] == h and h != 1:
            m = call(graph, aten.view.default, (m, [ms[0], hkv, g, ms[3]]))
    else:
        per_head = ms[1] == h and h != 1
        grouped = [*_grouped((ms[0], hkv, g) if per_head else (ms[0], 1, 1), drop), ms[2], ms[3]]
        if grouped == [*ms[:2], 1, *ms[2:]]:
            m = call(graph, aten.unsqueeze.default, (m, 2))
        elif grouped != ms:
            m = call(graph, aten.view.default, (m, grouped))
    if use.kind == "add":
        if use.scale != 1.0:
            m = call(graph, aten.mul.Tensor, (m, use.scale))
        return call(graph, aten.add.Tensor, (s, m))
    fill = use.fill * use.scale if math.isfinite(use.fill) else neg
    fill = max(fill, neg) if fill <= neg else fill  # a finite fill at or below the mask value is raised to it
    if use.kind == "keep":
        m = call(graph, aten.logical_not.default, (m,))
    return call(graph, aten.masked_fill.Scalar, (s, m, fill))


def _causal_term(gm: torch.fx.GraphModule, sq: int, sk: int, before: Node) -> MaskTerm:
    """``is_causal``: torch's ``tril`` over (S_q, S_k), top-left aligned — key j is visible to query
    i iff j <= i (also when S_q != S_k). As a fill mask in the scores' (1, S_k, 1, S_q) layout."""
    q = torch.arange(sq).view(1, sq)
    k = torch.arange(sk).view(sk, 1)
    name = add_constant(gm, (k > q).view(1, sk, 1, sq), "_anefx_mask")
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    return MaskTerm(node, per_head=False, fill=NEG_INF)


def _lift_output_projections(graph, back: Node, out4: Node, replay: HeadReplay) -> None:
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
            z = replay.lifted_conv(conv, out4)
            rows = _positions(graph, z, found[1], found[2], shape(conv))
        if rows is not None:
            conv.replace_all_uses_with(rows)


def _positions(graph, z: Node, zidx: torch.Tensor, zshape, out_shape) -> Node | None:
    """``z`` (``zshape``) moved so that element ``i`` of the result (``out_shape``) is element
    ``zidx[i]`` of ``z``: one ``permute`` and one ``reshape``, or None when no such pair does it."""
    idx = torch.arange(zidx.numel()).reshape(zshape)
    for perm in itertools.permutations(range(4)):
        if torch.equal(idx.permute(perm).reshape(out_shape), zidx):
            x = z if list(perm) == [0, 1, 2, 3] else call(graph, aten.permute.default, (z, list(perm)))
            return call(graph, aten.reshape.default, (x, list(out_shape)))
    return None
