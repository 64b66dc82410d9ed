"""Attention masks, lowered to per-key terms that per-head (B, C, 1, S) scores can apply exactly.

Per-head scores in the ANE layout are ``(B, S_k, 1, S_q)``. A mask that broadcasts against the
original ``(B, H, S_q, S_k)`` scores is turned into *terms*, each broadcastable to
``(B, S_k, H_m, S_q)`` (``H_m`` is 1, or H for per-head masks), applied to the scores in the
model's order. A term either *adds* a float tensor or *fills* the positions where a boolean tensor
is True with a value (``masked_fill``, MIL ``select``), so torch's semantics are kept exactly:

* ``masked_fill(scores, m, v)`` fills with ``v`` itself: a fill of 0.0 stays 0.0. Only a finite
  fill at or below the mask value (default -1e4) is raised to it, which fp16 can hold and which is
  still zero after softmax; ``-inf`` stays ``-inf``;
* a boolean keep-mask (``aten.scaled_dot_product_attention``'s ``attn_mask``) fills with ``-inf``
  (torch's meaning); ``a & b`` becomes one fill each, ``~m`` flips the mask;
* an additive mask built as ``masked_fill(zeros, m, v)``, ``where(m, v, 0)`` or
  ``(1 - keep.float()) * v`` (``keep`` boolean) with ``v`` at or below the mask value is the fill
  of ``m`` (``~keep``) with ``v`` (``scores + finfo.min`` *is* ``finfo.min`` in fp32), so rows
  whose keys are all masked keep torch's uniform weights;
* a constant (a causal mask) is transposed now, once, into a constant: a fill if its values are 0
  or masked, else an additive bias;
* a padding mask that is a ``(B, S_k)`` tensor broadcast to ``(B, ·, ·, S_k)`` through data
  movement (reshaped, or expanded over heads and flattened to ``(B·H, 1, S_k)`` as
  ``nn.MultiheadAttention`` does) becomes ``(B, S_k, 1, 1)`` with two ``unsqueeze`` — Apple's
  form, no transpose and no reshape; ``masked_fill(zeros_like(m), m, -inf)`` (MHA's float form of
  a boolean mask) is the fill of ``m``;
* ``move(a + b)`` (MHA adds ``attn_mask`` to the key padding mask, then views the sum per head) is
  lowered as ``move(a)`` and ``move(b)``;
* ``expand`` is dropped (broadcasting does it);
* anything else is made additive (clamped at the mask value) and transposed in the graph (one
  transpose per mask, shared).

A scale applied to the scores *after* a mask scales that mask's additive values and fill value
(``(s + m) * c == s * c + m * c``); the mask value clamp is applied after that scale.

Fully masked rows (every key masked), what anefx promises:

* fills with ``-inf`` give torch's result: NaN after an eager softmax; after
  ``scaled_dot_product_attention`` torch returns zeros, and so does anefx (the attention output is
  multiplied by "has a visible key", computed once per mask);
* fills with a finite value (``finfo.min``, ``-1e9``, ``-1e4`` …) give torch's uniform weights;
* a float mask computed at run time (not a recognised fill) is added clamped at the mask value: a
  row whose keys are all at or below it gets ``softmax(scores)``, where torch gives uniform weights
  (``finfo.min``) or NaN (``-inf``). Every row with at least one visible key is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.heads import MOVEMENT, index_map, movement_chain
from anefx.ir.graph import add_constant, call, dtype, eval_constant, is_constant, shape

aten = torch.ops.aten
_NOT = {aten.logical_not.default, aten.bitwise_not.default}
NEG_INF = -math.inf


@dataclass(frozen=True)
class MaskUse:
    """How attention scores use a mask, in the model's order.

    ``kind`` is ``keep`` (bool, True = attend; masked positions get ``fill``), ``drop`` (bool,
    True = masked) or ``add`` (float, added). ``scale`` is the product of the scalar factors applied
    to the scores after this mask (they scale the mask too)."""

    node: torch.fx.Node
    kind: str
    fill: float = NEG_INF
    scale: float = 1.0


@dataclass
class MaskTerm:
    node: torch.fx.Node  # broadcastable to (B, S_k, H_m, S_q)
    per_head: bool
    fill: float | None = None  # None: add ``node`` to the scores; else ``scores.masked_fill(node, fill)``


class MaskLowering:
    def __init__(self, gm: torch.fx.GraphModule, heads: int, dtype: torch.dtype, neg: float):
        self.gm, self.graph = gm, gm.graph
        self.heads, self.dtype, self.neg = heads, dtype, neg
        self.memo: dict[tuple, list[MaskTerm]] = {}
        self.visible_memo: dict[tuple, MaskTerm | None] = {}

    def fill_value(self, value: float) -> float:
        """The value a fill becomes: ``-inf`` and values above the mask value stay, the rest is raised."""
        return value if value == NEG_INF or value > self.neg else self.neg

    def lower(self, use: MaskUse) -> list[MaskTerm]:
        """The terms of ``use``, in the order they apply to the scores."""
        if use.kind == "add":
            return self._lower_add(use.node, use.scale)
        fill = use.fill * use.scale if use.fill != NEG_INF else NEG_INF
        return self._lower_bool(use.node, use.kind == "drop", self.fill_value(fill))

    # ------------------------------------------------------------------------------------------
    def _lower_bool(self, n: torch.fx.Node, drop: bool, fill: float) -> list[MaskTerm]:
        key = (n, drop, fill)
        if key in self.memo:
            return self.memo[key]
        t = n.target if n.op == "call_function" else None
        if not drop and t in (aten.logical_and.default, aten.bitwise_and.Tensor):
            terms = self._lower_bool(n.args[0], False, fill) + self._lower_bool(n.args[1], False, fill)
        elif drop and t in (aten.logical_or.default, aten.bitwise_or.Tensor):
            terms = self._lower_bool(n.args[0], True, fill) + self._lower_bool(n.args[1], True, fill)
        elif t in _NOT:
            terms = self._lower_bool(n.args[0], not drop, fill)
        elif t == aten.expand.default:
            terms = self._lower_bool(n.args[0], drop, fill)
        elif is_constant(n):
            value = torch.as_tensor(eval_constant(self.gm, n)).bool()
            terms = self._constant(value if drop else ~value, fill)
        else:
            terms = [self._from_2d(n, drop, fill) or self._generic(n, drop, fill)]
        self.memo[key] = terms
        return terms

    def _lower_add(self, n: torch.fx.Node, scale: float) -> list[MaskTerm]:
        key = (n, "add", scale)
        if key in self.memo:
            return self.memo[key]
        t = n.target if n.op == "call_function" else None
        terms = None
        if t == aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in n.args[:2]):
            terms = self._lower_add(n.args[0], scale) + self._lower_add(n.args[1], scale)
        elif t == aten.masked_fill.Scalar and _zero_based_fill(self.gm, n) is not None:
            fill = self.fill_value(float(n.args[2]) * scale)
            if fill in (self.neg, NEG_INF):
                terms = self._lower_bool(n.args[1], True, fill)  # s + finfo.min == finfo.min
        elif t == aten.mul.Tensor and isinstance(n.args[1], (int, float)) and _bool_complement(n.args[0]):
            fill = self.fill_value(float(n.args[1]) * scale)  # (1 - keep.float()) * finfo.min
            if fill == self.neg:  # (a -inf factor gives NaN on kept keys in torch: left generic)
                terms = self._lower_bool(_bool_complement(n.args[0]), False, fill)
        elif t == aten.expand.default:
            terms = self._lower_add(n.args[0], scale)
        if terms is None and is_constant(n):
            terms = self._constant_add(torch.as_tensor(eval_constant(self.gm, n)) * scale)
        if terms is None and t in MOVEMENT:
            from2d = self._from_2d(n, None, scale)
            terms = [from2d] if from2d is not None else self._through_movement(n, scale)
        if terms is None:
            terms = [self._from_2d(n, None, scale) or self._generic(n, None, scale)]
        self.memo[key] = terms
        return terms

    def _constant_add(self, value: torch.Tensor) -> list[MaskTerm]:
        value = value.to(torch.float64)
        masked = value <= self.neg
        if not ((value == 0) | masked).all():  # a real bias: add it
            return self._constant(value.clamp_min(self.neg).to(self.dtype), None)
        finite = torch.isfinite(value[masked])
        if finite.all():
            return self._constant(masked, self.neg)
        if not finite.any():
            return self._constant(masked, NEG_INF)
        return self._constant(value.clamp_min(self.neg).to(self.dtype), None)

    def _constant(self, value: torch.Tensor, fill: float | None) -> list[MaskTerm]:
        """``value`` is the bool fill mask (``fill`` set) or the additive tensor, in the scores' layout."""
        if not value.any():
            return []
        while value.dim() < 4:
            value = value.unsqueeze(0)
        bc = value.permute(0, 3, 1, 2).contiguous()  # (B, S_k, H, S_q)
        name = add_constant(self.gm, bc, "_anefx_mask")
        with self.graph.inserting_before(self._insertion_point()):
            node = self.graph.get_attr(name)
        node.meta["val"] = None
        return [MaskTerm(node, per_head=bc.shape[2] > 1, fill=fill)]

    def _from_2d(self, n: torch.fx.Node, drop: bool | None, arg: float) -> MaskTerm | None:
        """A mask that is a (B, S_k) tensor broadcast to (B, ·, ·, S_k) through data movement (a
        padding mask reshaped, or expanded over heads and flattened as ``nn.MultiheadAttention``
        does): Apple's (B, S_k, 1, 1) form. ``drop`` is None for an additive mask (``arg`` its
        scale), else ``arg`` is the fill."""
        src = key_mask_source(n)
        if src is None:
            return None
        if drop is None:
            fill = _zero_based_fill(self.gm, src)  # masked_fill(zeros, m, v): the fill of m with v
            if fill is not None and self.fill_value(fill[1] * arg) in (self.neg, NEG_INF):
                drop, src, arg = True, fill[0], self.fill_value(fill[1] * arg)
        with self.graph.inserting_before(self._insertion_point()):
            term = self._emit(src, drop, arg)
            node = call(self.graph, aten.unsqueeze.default, (call(self.graph, aten.unsqueeze.default, (term, 2)), 3))
        return MaskTerm(node, per_head=False, fill=None if drop is None else arg)

    def _through_movement(self, n: torch.fx.Node, scale: float) -> list[MaskTerm] | None:
        """``move(a + b)`` lowered as ``move(a) + move(b)`` (``nn.MultiheadAttention`` adds its
        ``attn_mask`` to the key padding mask over (B·H, S_q, S_k), then views the sum per head)."""
        found = movement_chain(n)
        if found is None or not found[1] or any(c.target not in MOVEMENT for c in found[1]):
            return None
        src, chain = found
        if src.op != "call_function" or src.target != aten.add.Tensor or len(src.args) != 2:
            return None
        ss = shape(src)
        if ss is None or not all(isinstance(a, torch.fx.Node) and shape(a) is not None for a in src.args):
            return None
        g = self.graph
        parts = []
        with g.inserting_before(self._insertion_point()):
            for a in src.args:
                x = a if shape(a) == ss else call(g, aten.expand.default, (a, list(ss)))
                for c in chain:
                    x = call(g, c.target, (x, *c.args[1:]), dict(c.kwargs))
                parts.append(x)
        return self._lower_add(parts[0], scale) + self._lower_add(parts[1], scale)

    def _emit(self, src: torch.fx.Node, drop: bool | None, arg: float) -> torch.fx.Node:
        """The fill mask (True = fill) or the clamped, scaled additive values of ``src``."""
        g = self.graph
        if drop is None:
            add = call(g, aten._to_copy.default, (src,), {"dtype": self.dtype})
            if arg != 1.0:
                add = call(g, aten.mul.Tensor, (add, arg))
            return call(g, aten.clamp_min.default, (add, self.neg))
        if dtype(src) == torch.bool:
            return src if drop else call(g, aten.logical_not.default, (src,))
        return call(g, aten.ne.Scalar if drop else aten.eq.Scalar, (src, 0))

    def _generic(self, n: torch.fx.Node, drop: bool | None, arg: float) -> MaskTerm:
        s = shape(n)
        with self.graph.inserting_before(self._insertion_point()):
            term = self._emit(n, drop, arg)
            if len(s) < 4:
                term = call(self.graph, aten.view.default, (term, [1] * (4 - len(s)) + list(s)))
            node = call(self.graph, aten.permute.default, (term, [0, 3, 1, 2]))
        return MaskTerm(node, per_head=(len(s) == 4 and s[1] > 1), fill=None if drop is None else arg)

    # ------------------------------------------------------------------------------------------
    def visible(self, terms: list[MaskTerm]) -> MaskTerm | None:
        """``(B, 1, H_m, S_q)`` in the scores' dtype (as a term): 1 where a query row has a key that no ``-inf``
        fill among ``terms`` masks, else 0 (torch's SDPA returns zeros for such rows). None when no
        row can be fully masked (known for constant masks)."""
        conds = [t.node for t in terms if t.fill == NEG_INF]
        per_head = any(t.per_head for t in terms if t.fill == NEG_INF)
        key = tuple(conds)
        if not conds or key in self.visible_memo:
            return self.visible_memo.get(key)
        g = self.graph
        if all(c.op == "get_attr" for c in conds):
            values = [torch.as_tensor(eval_constant(self.gm, c)) for c in conds]
            full = torch.stack(torch.broadcast_tensors(*values)).any(0).all(1, keepdim=True)
            if not full.any():
                self.visible_memo[key] = None
                return None
        with g.inserting_before(self._insertion_point()):
            union = conds[0]
            for c in conds[1:]:
                union = call(g, aten.logical_or.default, (union, c))
            keep = call(g, aten._to_copy.default, (call(g, aten.logical_not.default, (union,)),), {"dtype": self.dtype})
            vis = call(g, aten.amax.default, (keep, [1], True))  # a float reduction: no integer tensor
        self.visible_memo[key] = MaskTerm(vis, per_head)
        return self.visible_memo[key]

    def set_insertion_point(self, node: torch.fx.Node) -> None:
        """Lowered terms are inserted before ``node`` (the attention being rewritten) unless an
        earlier attention of the graph already made them (they are shared)."""
        self._before = node

    def _insertion_point(self) -> torch.fx.Node:
        return self._before


def key_mask_source(n: torch.fx.Node) -> torch.fx.Node | None:
    """The (B, S_k) tensor that the 4-D mask ``n`` (B, ·, ·, S_k) broadcasts through data movement
    only (every head and query reads key ``k`` of batch ``b`` at element ``b·S_k + k``), else None."""
    s = shape(n)
    if s is None or len(s) != 4:
        return None
    mapped = index_map(n)
    if mapped is None:
        return None
    src, r = mapped
    if shape(src) != (s[0], s[3]):
        return None
    want = torch.arange(s[0] * s[3]).view(s[0], 1, 1, s[3]).expand(s)
    return src if torch.equal(r, want) else None


_ZEROS = {aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default}


def _zero_based_fill(gm, n: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """``(m, v)`` when ``n`` is ``masked_fill(zeros, m, v)`` (zeros: a constant of zeros, or
    ``zeros_like``/``new_zeros``/``full_like(·, 0)``: 0 whatever its input), else None. This is how
    ``nn.MultiheadAttention`` turns a boolean key padding mask into a float one (``v = -inf``)."""
    fills = (aten.masked_fill.Scalar, aten.masked_fill_.Scalar)  # in place on a fresh zeros: the same value
    if n.op != "call_function" or n.target not in fills or not isinstance(n.args[2], (int, float)):
        return None
    base = n.args[0]
    if not isinstance(base, torch.fx.Node) or base.op not in ("call_function", "get_attr"):
        return None
    zero = base.target in _ZEROS or (base.target == aten.full_like.default and base.args[1] == 0)
    if not zero and is_constant(base):
        value = eval_constant(gm, base)
        zero = isinstance(value, torch.Tensor) and not value.any()
    if not zero or dtype(n.args[1]) != torch.bool:
        return None
    return n.args[1], float(n.args[2])


def _bool_complement(n: torch.fx.Node) -> torch.fx.Node | None:
    """``b`` when ``n`` is ``1.0 - b.float()`` for a boolean ``b`` (so ``n`` is 0 or 1), else None."""
    if n.op != "call_function" or n.target != aten.rsub.Scalar or n.args[1] != 1 or len(n.args) > 2:
        return None
    cast = n.args[0]
    if cast.op != "call_function" or cast.target not in (aten.to.dtype, aten._to_copy.default):
        return None
    src = cast.args[0]
    return src if isinstance(src, torch.fx.Node) and dtype(src) == torch.bool else None


# ----------------------------------------------------------------------------------------------
_SCORES = {
    aten.matmul.default,
    aten.mm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.addmm.default,
    aten.einsum.default,
    aten.linear.default,
    aten.conv2d.default,
    aten.convolution.default,
    aten.scaled_dot_product_attention.default,
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
#: Ops a mask is built with and flows through on its way to the scores (besides data movement).
_MASK_OPS = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarSelf,
    aten.where.ScalarOther, aten.where.Scalar, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.minimum.default, aten.maximum.default, aten.full.default,
    aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.fill.Scalar,
    aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.cat.default, aten.index.Tensor,
    aten.select.int, aten.repeat.default, aten.logical_not.default, aten.logical_and.default,
    aten.logical_or.default, aten.bitwise_not.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
}  # fmt: skip


def mask_values(graph: torch.fx.Graph) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
    """Where a graph's attention masks are: ``(masks, masked)``.

    ``masked`` holds the nodes whose value reaches a softmax's input (or an SDPA's ``attn_mask``)
    through the arithmetic, selection, movement and cast ops masks are built with; ``masks`` those
    of them that do not depend on a product of activations (``matmul``, ``linear``, ``conv``,
    ``einsum`` …), i.e. mask tensors, not scores. A ``masked_fill`` in ``masked`` fills scores with
    a mask value; ``x * -1e6`` on activations, or a ``clamp(min=-1e5)`` that no softmax reads, is
    neither."""
    masked: set[torch.fx.Node] = set()
    pending = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in SOFTMAX and isinstance(n.args[0], torch.fx.Node):
            pending.append(n.args[0])
        elif n.target == aten.scaled_dot_product_attention.default:
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            if isinstance(mask, torch.fx.Node):
                pending.append(mask)
    while pending:
        n = pending.pop()
        if n in masked:
            continue
        masked.add(n)
        if n.op == "call_function" and (n.target in _MASK_OPS or n.target in MOVEMENT):
            pending.extend(n.all_input_nodes)
    scores: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and (n.target in _SCORES or any(i in scores for i in n.all_input_nodes)):
            scores.add(n)
    return masked - scores, masked
