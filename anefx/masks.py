"""Attention masks, lowered to the additive per-key form that per-head (B, C, 1, S) scores need.

Per-head scores in the ANE layout are ``(B, S_k, 1, S_q)``. A mask that broadcasts against the
original ``(B, H, S_q, S_k)`` scores is turned into *terms* to add to them, each broadcastable to
``(B, S_k, H_m, S_q)`` (``H_m`` is 1, or H for per-head masks):

* ``a & b`` (boolean keep-masks) becomes the sum of both terms; an all-true constant disappears;
* ``expand`` is dropped (broadcasting does it);
* a padding mask reshaped from a ``(B, S_k)`` tensor becomes ``(B, S_k, 1, 1)`` with two
  ``unsqueeze`` — Apple's form, no transpose and no reshape;
* a constant (a causal mask) is transposed now, once, into a constant;
* an additive mask built from the fp32 minimum (``masked_fill(zeros, ~keep, finfo.min)``) becomes
  the same keep-mask with a large *finite* negative (default -1e4), which fp16 can hold;
* anything else is made additive and transposed in the graph (one transpose per mask, shared).

The sum of two -1e4 terms is -2e4, still finite in fp16 and still zero after softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.graph import add_constant, call, eval_constant, is_constant, shape
from anefx.heads import index_map

aten = torch.ops.aten
_NOT = {aten.logical_not.default, aten.bitwise_not.default}


@dataclass
class MaskTerm:
    node: torch.fx.Node  # broadcastable to (B, S_k, H_m, S_q)
    per_head: bool


class MaskLowering:
    def __init__(self, gm: torch.fx.GraphModule, heads: int, dtype: torch.dtype, neg: float):
        self.gm, self.graph = gm, gm.graph
        self.heads, self.dtype, self.neg = heads, dtype, neg
        self.memo: dict[tuple[torch.fx.Node, str], list[MaskTerm]] = {}

    def lower(self, node: torch.fx.Node, kind: str) -> list[MaskTerm]:
        """Terms for ``node``: kind ``keep`` (bool, True = attend), ``drop`` (bool) or ``add`` (float)."""
        key = (node, kind)
        if key not in self.memo:
            self.memo[key] = self._lower(node, kind)
        return self.memo[key]

    # ------------------------------------------------------------------------------------------
    def _lower(self, n: torch.fx.Node, kind: str) -> list[MaskTerm]:
        t = n.target if n.op == "call_function" else None
        if kind == "keep" and t in (aten.logical_and.default, aten.bitwise_and.Tensor):
            return self.lower(n.args[0], "keep") + self.lower(n.args[1], "keep")
        if kind in ("keep", "drop") and t in _NOT:
            return self.lower(n.args[0], "drop" if kind == "keep" else "keep")
        if kind == "add" and t == aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in n.args[:2]):
            return self.lower(n.args[0], "add") + self.lower(n.args[1], "add")
        if kind == "add" and t == aten.masked_fill.Scalar and is_constant(n.args[0]):
            base = eval_constant(self.gm, n.args[0])
            if isinstance(base, torch.Tensor) and not base.any() and float(n.args[2]) <= self.neg:
                return self.lower(n.args[1], "drop")
        if t == aten.expand.default:
            return self.lower(n.args[0], kind)
        if is_constant(n):
            return self._constant(n, kind)
        padding = self._from_2d(n, kind)
        if padding is not None:
            return [padding]
        return [self._generic(n, kind)]

    def _additive(self, value: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "keep":
            return torch.where(value.bool(), 0.0, self.neg).to(self.dtype)
        if kind == "drop":
            return torch.where(value.bool(), self.neg, 0.0).to(self.dtype)
        return value.to(self.dtype).clamp_min(self.neg)

    def _constant(self, n: torch.fx.Node, kind: str) -> list[MaskTerm]:
        value = eval_constant(self.gm, n)
        add = self._additive(torch.as_tensor(value), kind)
        if not add.any():
            return []
        while add.dim() < 4:
            add = add.unsqueeze(0)
        bc = add.permute(0, 3, 1, 2).contiguous()  # (B, S_k, H, S_q)
        name = add_constant(self.gm, bc, "_anefx_mask")
        with self.graph.inserting_before(self._first_user(n)):
            node = self.graph.get_attr(name)
        node.meta["val"] = None
        return [MaskTerm(node, per_head=bc.shape[2] > 1)]

    def _from_2d(self, n: torch.fx.Node, kind: str) -> MaskTerm | None:
        """A (B, 1, 1, S_k) mask that is a (B, S_k) tensor reshaped: Apple's (B, S_k, 1, 1) form."""
        s = shape(n)
        if s is None or len(s) != 4 or s[1] != 1 or s[2] != 1:
            return None
        mapped = index_map(n)
        if mapped is None:
            return None
        src, r = mapped
        if shape(src) != (s[0], s[3]) or not torch.equal(r.reshape(-1), torch.arange(r.numel())):
            return None
        with self.graph.inserting_before(self._first_user(n)):
            add = self._emit_additive(src, kind)
            node = call(self.graph, aten.unsqueeze.default, (call(self.graph, aten.unsqueeze.default, (add, 2)), 3))
        return MaskTerm(node, per_head=False)

    def _emit_additive(self, src: torch.fx.Node, kind: str) -> torch.fx.Node:
        g = self.graph
        as_float = call(g, aten._to_copy.default, (src,), {"dtype": self.dtype})
        if kind == "add":
            return call(g, aten.clamp_min.default, (as_float, self.neg))
        if kind == "keep":  # (1 - keep) * neg
            return call(g, aten.mul.Tensor, (call(g, aten.rsub.Scalar, (as_float, 1.0)), self.neg))
        return call(g, aten.mul.Tensor, (as_float, self.neg))

    def _generic(self, n: torch.fx.Node, kind: str) -> MaskTerm:
        s = shape(n)
        with self.graph.inserting_before(self._first_user(n)):
            add = self._emit_additive(n, kind)
            if len(s) < 4:
                add = call(self.graph, aten.view.default, (add, [1] * (4 - len(s)) + list(s)))
            node = call(self.graph, aten.permute.default, (add, [0, 3, 1, 2]))
        return MaskTerm(node, per_head=(len(s) == 4 and s[1] > 1))

    def _first_user(self, n: torch.fx.Node) -> torch.fx.Node:
        return min(n.users) if n.users else n.next  # fx nodes compare by their position in the graph
