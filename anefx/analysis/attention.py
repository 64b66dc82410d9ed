"""Attention in a graph, found by patterns declared as data.

Every attention is ``softmax(scores) @ v`` with ``scores = q @ k^T`` followed, in the model's
order, by scale factors, masks and a soft-cap; or one ``aten.scaled_dot_product_attention``. What
varies between models is which op computes each product and what sits between them. Those are
tables here, not branches:

* :data:`PATTERNS` — one row per spelling: the op of the value product (the anchor), the rank of
  its operands (4: (B, H, S, D); 3: (B·H, S, D)), the op of the score product, and a plain
  function reading ``q`` and ``k^T`` (and a bias it adds, as ``baddbmm`` does) off that op;
* :data:`WEIGHT_STEPS` — ops between the softmax and the value product that keep the weights;
* :data:`SCORE_STEPS` — ops between the score product and the softmax (masks, scalar factors,
  ``tanh`` soft-capping, casts, head regrouping views), each one line.

A new spelling is a new row (or step), in the manner of ``torch/_inductor/pattern_matcher.py``,
whose patterns are plain functions; like inductor's ``FailedMatch``, a failed match is a
:class:`NoMatch` that is false and says why, so ``ANEFX_MATCH_DEBUG=<node names>`` can print, per
node, what each pattern found (:func:`explain`).

Whether a softmax *is* an attention does not depend on the patterns: :func:`attention_softmaxes`
finds every softmax computed from a product of two activations whose result is multiplied with an
activation. The attention pass counts each of them it did not match as unmatched, with the
reason, so no attention is ever missed silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx

from anefx.analysis.head_program import HeadProgram, trace_program
from anefx.analysis.heads import Heads, index_map, trace_heads
from anefx.analysis.masks import MaskUse
from anefx.ir.graph import describe, dtype, is_constant, op_name, shape, val

aten = torch.ops.aten
Node = torch.fx.Node
SOFTMAX = {aten.softmax.int, aten._softmax.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class NoMatch:
    """Why ``node`` is not a rewritable attention; false in a boolean context."""

    node: Node
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass
class Attention:
    """One attention computation found in the graph."""

    pattern: str  # the row of PATTERNS (or "sdpa") that matched
    out: Node  # (B, H, S_q, D_v), or (B·H, S_q, D_v) with ``heads``
    q: Node
    k: Node
    v: Node
    scale: float
    masks: list[MaskUse] = field(default_factory=list)  # in the order they apply to the scores
    causal: bool = False
    sdpa: bool = False  # torch's SDPA: rows whose keys are all masked give zeros
    heads: int | None = None  # q, k, v and out are 3-D (B·H, S, D) with this H (``bmm`` attention)
    softcap: float | None = None  # scores = tanh(q·k · scale) · softcap, then the masks (logit soft-capping)
    softmax: Node | None = None  # the softmax it reads (None for SDPA)

    def shape4(self, t: Node) -> tuple[int, ...] | None:
        """``t``'s shape as (B, H, S, D) (3-D ``bmm`` operands split into B and H)."""
        s = shape(t)
        if self.heads is None or s is None or len(s) != 3:
            return s
        return (s[0] // self.heads, self.heads, s[1], s[2])


@dataclass
class ScoreProduct:
    """What a score product op reads: ``q``, ``k^T``, and masks it applies itself (a bias) with
    the factor (``alpha``) it applies to ``q · k^T``."""

    q: Node
    kt: Node
    masks: list[MaskUse] = field(default_factory=list)
    alpha: float = 1.0


@dataclass(frozen=True)
class Pattern:
    """One spelling of ``softmax(q @ k^T …) @ v``: the ops of both products and how the score
    product's operands are read."""

    name: str
    value_product: object  # the anchor (an aten op): weights @ v
    rank: int  # of q, k, v: 4 = (B, H, S, D), 3 = (B·H, S, D)
    score_product: object  # an aten op: q @ k^T
    operands: Callable[[Node, float], ScoreProduct | NoMatch]  # (score product, scale after it)


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _product(node: Node, scale: float) -> ScoreProduct:
    """``q @ k^T`` (``matmul``, ``bmm``)."""
    return ScoreProduct(*node.args[:2])


def _baddbmm(node: Node, scale: float) -> ScoreProduct | NoMatch:
    """``beta · bias + alpha · (q @ k^T)`` (ALiBi biases, fairseq): the bias is a mask added first."""
    a = dict(zip(["input", "batch1", "batch2", "beta", "alpha"], node.args))
    a.update(node.kwargs)
    beta, alpha = _scalar(a.get("beta", 1)), _scalar(a.get("alpha", 1))
    if beta is None or alpha is None or not isinstance(a["input"], Node):
        return NoMatch(node, f"{describe(node)}: baddbmm with a tensor beta/alpha is not rewritten")
    masks = [MaskUse(a["input"], "add", scale=scale * beta)] if beta != 0 else []
    return ScoreProduct(a["batch1"], a["batch2"], masks, alpha)


#: One row per spelling; a new spelling of the products is a new row.
PATTERNS: tuple[Pattern, ...] = (
    Pattern("matmul", aten.matmul.default, 4, aten.matmul.default, _product),  # eager: q @ k.transpose(-1, -2)
    Pattern("bmm", aten.bmm.default, 3, aten.bmm.default, _product),  # fairseq, BART, older OPT
    Pattern("baddbmm", aten.bmm.default, 3, aten.baddbmm.default, _baddbmm),  # Bloom's ALiBi, fairseq's bias
)
_RANK = {p.value_product: p.rank for p in PATTERNS}


# -- between the softmax and the value product --------------------------------------------------
def _float_cast(n: Node, rank: int = 0) -> bool:
    """A cast between floating dtypes (the softmax upcast and the cast back)."""
    if n.op != "call_function" or n.target not in _CASTS or not isinstance(n.args[0], Node):
        return False
    src, out = dtype(n.args[0]), dtype(n)
    return src is not None and out is not None and src.is_floating_point and out.is_floating_point


def _regroups_heads(n: Node, rank: int) -> bool:
    """In (B·H, S, D) attention: a view between (B·H, S_q, S_k) and (B, H, S_q, S_k) (same order)."""
    a, b = shape(n.args[0]), shape(n)
    if rank != 3 or a is None or b is None or {len(a), len(b)} != {3, 4}:
        return False
    three, four = (a, b) if len(a) == 3 else (b, a)
    return three == (four[0] * four[1], four[2], four[3])


def _always(n: Node, rank: int) -> bool:
    return True


#: op -> whether this node passes the attention weights on unchanged (given the pattern's rank)
WEIGHT_STEPS: dict[object, Callable[[Node, int], bool]] = {
    aten.dropout.default: _always,  # dropout in eval
    aten.clone.default: _always,
    aten.alias.default: _always,
    aten.to.dtype: _float_cast,  # softmax(x, dtype=float32).to(q.dtype)
    aten._to_copy.default: _float_cast,
    **dict.fromkeys(_VIEWS, _regroups_heads),  # (B, H, S_q, S_k) weights viewed as (B·H, S_q, S_k) (Bloom)
}


# -- between the score product and the softmax --------------------------------------------------
@dataclass
class _Walk:
    """The walk from the softmax back to the score product: masks (softmax side first), the
    product of the scalar factors met so far, the soft-cap."""

    rank: int
    masks: list[MaskUse] = field(default_factory=list)
    scale: float = 1.0
    softcap: float | None = None


def _mask_add(x: Node, w: _Walk) -> Node | NoMatch:
    """``scores + mask`` (either operand order)."""
    if not all(isinstance(a, Node) for a in x.args[:2]):
        return NoMatch(x, f"{describe(x)}: a scalar added to the scores is not rewritten")
    if w.softcap is not None:
        return NoMatch(x, f"{describe(x)}: a mask before the soft-cap's tanh is not rewritten")
    left, right = x.args[:2]
    mask, scores = (right, left) if _depends_on_product(left) else (left, right)
    w.masks.append(MaskUse(mask, "add", scale=w.scale))
    return scores


def _mask_fill(x: Node, w: _Walk) -> Node | NoMatch:
    """``scores.masked_fill(m, v)``."""
    if _scalar(x.args[2]) is None or w.softcap is not None:
        return NoMatch(x, f"{describe(x)}: a fill with a tensor value or before a soft-cap is not rewritten")
    w.masks.append(MaskUse(x.args[1], "drop", fill=_scalar(x.args[2]), scale=w.scale))
    return x.args[0]


def _factor(x: Node, w: _Walk) -> Node | NoMatch:
    """``scores * c`` or ``scores / c`` (c a scalar)."""
    s = _scalar(x.args[1])
    if s is None:
        return NoMatch(x, f"{describe(x)} between QK^T and softmax has no per-head form (a tensor factor)")
    if s == 0 or (w.masks and s < 0):  # a negative factor after a mask would turn it into a bonus
        return NoMatch(x, f"{describe(x)}: a zero or negative factor after a mask is not rewritten")
    w.scale = w.scale * s if x.target == aten.mul.Tensor else w.scale / s
    return x.args[0]


def _tanh(x: Node, w: _Walk) -> Node | NoMatch:
    """``c · tanh(scores / c)``: logit soft-capping (Gemma 2); later factors go into q."""
    if w.softcap is not None:
        return NoMatch(x, f"{describe(x)}: two soft-caps are not rewritten")
    w.softcap, w.scale = w.scale, 1.0
    return x.args[0]


def _step(check: Callable[[Node, int], bool]) -> Callable[[Node, _Walk], Node | NoMatch]:
    def walk(x: Node, w: _Walk) -> Node | NoMatch:
        if not check(x, w.rank):
            return NoMatch(x, f"{describe(x)} between QK^T and softmax has no per-head form")
        return x.args[0]

    return walk


#: op -> how it changes the scores, read walking from the softmax back to the score product
SCORE_STEPS: dict[object, Callable[[Node, _Walk], Node | NoMatch]] = {
    aten.add.Tensor: _mask_add,
    aten.masked_fill.Scalar: _mask_fill,
    aten.mul.Tensor: _factor,
    aten.div.Tensor: _factor,
    aten.tanh.default: _tanh,
    aten.to.dtype: _step(_float_cast),  # softmax(scores.float())
    aten._to_copy.default: _step(_float_cast),
    **dict.fromkeys(_VIEWS, _step(_regroups_heads)),  # (B·H, S_q, S_k) scores viewed per head to add a mask
}
_PRODUCTS = {p.score_product for p in PATTERNS}


def _depends_on_product(n: Node, depth: int = 6) -> bool:
    for _ in range(depth):
        if n.op != "call_function":
            return False
        if n.target in _PRODUCTS:
            return True
        n = n.args[0] if n.args and isinstance(n.args[0], Node) else n
    return False


def _swaps_last_two(n: Node, rank: int) -> bool:
    if n.op != "call_function" or len(shape(n) or ()) != rank:
        return False
    if n.target == aten.transpose.int:
        return sorted(d % rank for d in n.args[1:]) == [rank - 2, rank - 1]
    return n.target == aten.permute.default and [d % rank for d in n.args[1]] == [*range(rank - 2), rank - 1, rank - 2]


# -- matching -----------------------------------------------------------------------------------
def match_attention(node: Node) -> Attention | NoMatch | None:
    """The attention ``node`` computes (SDPA, or a value product of :data:`PATTERNS`), a
    :class:`NoMatch` saying why an attention there is not matched, or None when ``node`` is no
    attention's output (a product that reads no softmax)."""
    if node.op != "call_function":
        return None
    if node.target == aten.scaled_dot_product_attention.default:
        return _match_sdpa(node)
    rank = _RANK.get(node.target)
    if rank is None or len(node.args) != 2:
        return None
    weights, v = node.args
    while (
        weights.op == "call_function" and weights.target in WEIGHT_STEPS and WEIGHT_STEPS[weights.target](weights, rank)
    ):
        weights = weights.args[0]
    if weights.op != "call_function" or weights.target not in SOFTMAX:
        return None
    if weights.args[1] % len(shape(weights) or (0,)) != len(shape(weights) or (0,)) - 1:
        return NoMatch(weights, f"{describe(weights)}: a softmax over another axis than the keys")
    walk = _Walk(rank)
    x = weights.args[0]
    while x.op == "call_function" and x.target in SCORE_STEPS:
        x = SCORE_STEPS[x.target](x, walk)
        if isinstance(x, NoMatch):
            return x
    walk.masks.reverse()
    pattern = next((p for p in PATTERNS if p.value_product == node.target and p.score_product == x.target), None)
    if pattern is None and _activation_product(x):
        return NoMatch(x, f"{describe(x)}: no attention pattern has this score product ({op_name(node)} weights @ v)")
    if pattern is None:
        return NoMatch(x, f"{describe(x)} between QK^T and softmax has no per-head form (no pattern reads it)")
    found = pattern.operands(x, walk.scale)
    if isinstance(found, NoMatch):
        return found
    if not _swaps_last_two(found.kt, rank):
        return NoMatch(found.kt, f"{describe(found.kt)}: the key operand of the scores is not a transposed K")
    q, scale = found.q, walk.scale * found.alpha
    if q.op == "call_function" and q.target == aten.mul.Tensor and _scalar(q.args[1]) is not None:
        scale *= _scalar(q.args[1])  # every factor goes into Q; masks after one carry it
        q = q.args[0]
    masks = found.masks + walk.masks
    att = Attention(pattern.name, node, q, found.kt.args[0], v, scale, masks, softcap=walk.softcap, softmax=weights)
    return _bmm_heads(att) if rank == 3 else att


def _match_sdpa(node: Node) -> Attention | NoMatch:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("dropout_p", 0.0):
        return NoMatch(node, f"{describe(node)}: attention dropout (dropout_p > 0) is not rewritten")
    d = shape(a["query"])[-1]
    scale = a.get("scale")
    att = Attention(
        "sdpa", node, a["query"], a["key"], a["value"], float(scale) if scale is not None else 1 / math.sqrt(d)
    )
    mask = a.get("attn_mask")
    if mask is not None:
        att.masks.append(MaskUse(mask, "keep" if val(mask).dtype == torch.bool else "add"))
    att.causal = bool(a.get("is_causal", False))
    att.sdpa = True
    return att


def _bmm_heads(att: Attention) -> Attention | NoMatch:
    """H of (B·H, S, D) attention: B is the batch of the (B, S, C) or (B, C, 1, S) tensor q's heads
    are read from; k, v and the masks must be (B·H, ·, ·) alike."""
    q, qs = att.q, shape(att.q)
    mapped = index_map(q)
    src = shape(mapped[0]) if mapped is not None else None
    if qs is None or len(qs) != 3 or src is None or len(src) not in (3, 4) or src[0] == 0 or qs[0] % src[0]:
        return NoMatch(
            q, f"{describe(q)}: (B·H, S, D) bmm attention whose heads are not channel blocks of a projection"
        )
    att.heads = qs[0] // src[0]
    if any(len(shape(t) or ()) != 3 or shape(t)[0] != qs[0] for t in (att.k, att.v)):
        return NoMatch(att.out, f"{describe(att.out)}: q, k and v of (B·H, S, D) attention differ in B·H")
    for m in att.masks:  # a mask over the (B·H, S_q, S_k) scores: per (batch, head), or broadcast
        ms = shape(m.node)
        if ms is None or (len(ms) == 3 and ms[0] not in (1, qs[0])):
            return NoMatch(m.node, f"{describe(m.node)}: a mask over (B·H, S_q, S_k) scores in another grouping")
    return att


def explain(node: Node) -> str:
    """What the patterns make of ``node`` (for ``ANEFX_MATCH_DEBUG``)."""
    found = match_attention(node)
    if found is None:
        return f"{describe(node)}: no attention pattern is anchored here (no softmax feeds this product)"
    if isinstance(found, NoMatch):
        return f"{describe(node)}: not matched: {found.reason}"
    return f"{describe(node)}: matched pattern {found.pattern!r} ({len(found.masks)} mask(s), scale {found.scale:g})"


# -- what attention reads -----------------------------------------------------------------------
#: q, k and v, each as channel blocks or a per-head program
Traced = list[Heads | HeadProgram]


def trace_inputs(att: Attention) -> Traced | NoMatch:
    """Q, K and V as channel blocks (:class:`Heads`) or per-head programs, or why not; also
    refuses shapes anefx does not rewrite (yet): batch or sequence mismatches, odd GQA ratios."""
    traced = []
    for t in (att.q, att.k, att.v):
        found = trace_heads(t, att.heads)
        if found is None and att.heads is not None:
            return NoMatch(
                t, f"{describe(t)}: (B·H, S, D) bmm attention whose heads are not channel blocks of a projection"
            )
        if found is None:
            found = trace_program(t)
            if isinstance(found, str):
                return NoMatch(t, found)
        traced.append(found)
    q, k, v = (att.shape4(t) for t in (att.q, att.k, att.v))
    h = len(heads_of(traced[0]))
    if None in (q, k, v) or q[0] != k[0] or k[2] != v[2] or any(h % len(heads_of(t)) for t in traced[1:]):
        return NoMatch(att.out, "batch, sequence or GQA ratio mismatch")
    return traced


@dataclass(frozen=True)
class KeysLast:
    """A (B, H, S, D) key or value tensor that is a (B, H_kv, D, S) tensor read as it lies: head ``h``
    is the transposed plane of head ``h // (H / H_kv)`` of ``source`` (grouped-query heads repeated).
    A KV cache is kept this way (:mod:`anefx.lm.cache`): positions on the last axis, so the score
    product ``q @ source`` reads it without a transpose."""

    source: Node  # (B, H_kv, D, S)
    heads: int  # H_kv

    @property
    def head_dim(self) -> int:
        return shape(self.source)[2]


def keys_last(node: Node, heads: int | None = None) -> KeysLast | None:
    """``node`` (B, H, S, D) — or (B·H, S, D) with ``heads`` = H, as ``bmm`` attention holds it — as a
    :class:`KeysLast` tensor (through data movement only), or None."""
    out = shape(node)
    if out is None or len(out) != (3 if heads else 4):
        return None
    if heads:
        out = (out[0] // heads, heads, out[1], out[2])
    mapped = index_map(node)
    if mapped is None:
        return None
    src, r = mapped
    s = shape(src)
    if s is None or len(s) != 4 or s[0] != out[0] or s[2] != out[3] or s[3] != out[2] or s[1] == 0 or out[1] % s[1]:
        return None
    idx = torch.arange(math.prod(s)).reshape(s).transpose(2, 3).repeat_interleave(out[1] // s[1], dim=1)
    return KeysLast(src, s[1]) if torch.equal(r.reshape(idx.shape), idx) else None


def trace_cached(att: Attention) -> tuple[Heads | HeadProgram, KeysLast, KeysLast] | NoMatch:
    """Q as channel blocks or a per-head program, K and V as :class:`KeysLast` tensors (attention
    over a KV cache kept keys-last), or why not."""
    k, v = keys_last(att.k, att.heads), keys_last(att.v, att.heads)
    if k is None or v is None:
        return NoMatch(att.out, f"{describe(att.out)}: K and V are not both keys-last (B, H_kv, D, S) tensors")
    q = trace_heads(att.q, att.heads)
    if q is None and att.heads is None:
        q = trace_program(att.q)
        if isinstance(q, str):
            return NoMatch(att.q, q)
    if q is None:
        return NoMatch(att.q, f"{describe(att.q)}: (B·H, S, D) queries that are not channel blocks of a projection")
    b, h = att.shape4(att.q)[:2]
    if k.heads != v.heads or h % k.heads or shape(k.source)[0] != b or shape(k.source)[3] != shape(v.source)[3]:
        return NoMatch(att.out, "batch, sequence or GQA ratio mismatch")
    return q, k, v


def heads_of(t: Heads | HeadProgram) -> list[int]:
    return t.offsets if isinstance(t, Heads) else t.head_map


def per_query_head(offsets: list[int], heads: int) -> list[int]:
    """K/V offsets for each query head: with grouped-query attention, ``heads / len(offsets)`` query
    heads share each K/V head."""
    return [offsets[i // (heads // len(offsets))] for i in range(heads)]


# -- every attention, whatever its spelling -----------------------------------------------------
#: products of two tensors (scores and weighted sums in any spelling)
PRODUCT_OPS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default, aten.mm.default}


def _contraction(n: Node) -> bool:
    """A product of two activations in any spelling: a product op, or a sum over their
    elementwise product (``(q[..., None, :] * k[..., None, :, :]).sum(-1)``)."""
    if _activation_product(n):
        return True
    if n.op != "call_function" or n.target != aten.sum.dim_IntList or not isinstance(n.args[0], Node):
        return False
    m = n.args[0]
    return (
        m.op == "call_function"
        and m.target == aten.mul.Tensor
        and all(isinstance(a, Node) and not is_constant(a) for a in m.args[:2])
    )


#: the normalisations an attention's weights may be spelled with: the patterns rewrite
#: :data:`SOFTMAX`; the others (and ``exp(x) / exp(x).sum(-1, keepdim=True)``) are counted only
NORMALIZERS = {
    *SOFTMAX, aten._safe_softmax.default, aten.log_softmax.int, aten._log_softmax.default,
}  # fmt: skip


def _normalizes(n: Node) -> bool:
    """Whether ``n`` normalises attention scores: a softmax op, or one spelled out, ``e / e.sum(d)``
    with ``e = exp(…)``."""
    if n.op != "call_function":
        return False
    if n.target in NORMALIZERS:
        return True
    if n.target != aten.div.Tensor or not all(isinstance(a, Node) for a in n.args[:2]):
        return False
    e, total = n.args[:2]
    return (
        e.op == "call_function"
        and e.target == aten.exp.default
        and total.op == "call_function"
        and total.target == aten.sum.dim_IntList
        and total.args[0] is e
    )


def _activation_product(n: Node) -> bool:
    if n.op != "call_function" or n.target not in PRODUCT_OPS:
        return False
    operands = n.args[:2]
    if n.target == aten.einsum.default:
        operands = n.args[1]
    elif n.target == aten.baddbmm.default:  # (bias, q, k^T, …)
        operands = n.args[1:3]
    tensors = [a for a in operands if isinstance(a, Node)]
    return len(tensors) >= 2 and not any(is_constant(a) for a in tensors)


#: ops an attention's scores and weights never pass through (projections and norms end the search)
_BOUNDARIES = {
    aten.conv2d.default, aten.convolution.default, aten.linear.default, aten.layer_norm.default,
    aten.embedding.default, aten.scaled_dot_product_attention.default, *NORMALIZERS,
}  # fmt: skip


@dataclass(frozen=True)
class Reader:
    """The product that reads a softmax's weights, and the ops between them (softmax side first)."""

    product: Node
    path: tuple[Node, ...]

    def why_unmatched(self, softmax: Node) -> str:
        """The reason to give when no pattern matched this attention."""
        between = ", ".join(f"%{n.name} ({op_name(n)})" for n in self.path)
        through = f" through {between}" if between else ""
        return f"{describe(softmax)}: weights read by {describe(self.product)}{through}: no attention pattern"


def attention_softmaxes(graph: torch.fx.Graph, depth: int = 8) -> dict[Node, Reader]:
    """Every softmax that is an attention's, whatever its spelling (of the softmax: see
    :func:`_normalizes`; of the products: see :func:`_contraction`), with the product that reads
    it: computed from a product of two activations and read by one, each within ``depth`` ops
    that are neither projections nor norms. Independent of :data:`PATTERNS`, so a spelling no
    pattern knows is still found."""
    found = {}
    for n in graph.nodes:
        if not _normalizes(n) or len(shape(n) or ()) < 3:
            continue
        reader = _reach(n, lambda m: list(m.users), depth)
        if reader is not None and _reach(n, lambda m: m.all_input_nodes, depth) is not None:
            found[n] = reader
    return found


def _reach(start: Node, step: Callable[[Node], list[Node]], depth: int) -> Reader | None:
    """The first product of two activations reached from ``start`` by ``step`` (breadth first)."""
    came_from: dict[Node, Node | None] = {start: None}
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in step(n):
                if m in came_from or m.op != "call_function" or m.target in _BOUNDARIES or _normalizes(m):
                    continue
                came_from[m] = n
                if _contraction(m):
                    path = []
                    while came_from[n] is not None:
                        path.append(n)
                        n = came_from[n]
                    return Reader(m, tuple(reversed(path)))
                nxt.append(m)
        frontier = nxt
    return None
