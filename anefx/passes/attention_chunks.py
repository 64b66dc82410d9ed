"""``attention_chunks`` — per-head attention whose score tensor is too large is computed in query chunks.

A per-head score tensor is ``(B, S_k, 1, S_q)``: at long sequences (ViT at high resolution, audio
encoders, latent grids) it outgrows the ANE's working memory. Softmax runs over the keys (axis 1), so
queries are independent: the queries are split into chunks along the sequence axis, each chunk gets
its own scores, mask terms, softmax and weighted sum, and the chunk outputs are concatenated back on
the sequence axis. Every chunk is as wide as fits under ``max_bytes`` (a multiple of 32 queries, one
64-byte row of fp16, when that fits), the last one takes the tail, so any ``S_q`` works. Mask terms
that vary along the queries (causal masks, per-query masks) are sliced with their chunk; those that
do not (key padding) are shared. Runs after ``attention_bc1s``, on the per-head einsums it emits.

Original::

    %s = einsum("bchq,bkhc->bkhq", %q_h, %k_h)             # (B, S_k, 1, S_q): too large
    %w = aten._softmax(aten.add(%s, %mask), 1)
    %o = einsum("bkhq,bchk->bchq", %w, %v_h)                # (B, D, 1, S_q)
Result::

    %q_c = aten.slice(%q_h, 3, a, b)                        # one chunk of queries, c = 0 … n-1
    %w_c = aten._softmax(aten.add(einsum("bchq,bkhc->bkhq", %q_c, %k_h), aten.slice(%mask, 3, a, b)), 1)
    %o_c = einsum("bkhq,bchk->bchq", %w_c, %v_h)            # (B, D, 1, b - a)
    %o = aten.cat([%o_0, …, %o_{n-1}], 3)

Options:
  max_bytes: the largest per-head score tensor kept whole, in bytes as on the ANE (fp16, the last
    axis padded to 64 bytes); default 1 MiB (up to 712 queries x 712 keys). Larger ones are chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.layout import padded_bytes
from anefx.ir.graph import call, dce, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
SCORES = "bchq,bkhc->bkhq"
WEIGHTED = "bkhq,bchk->bchq"
#: Ops allowed between the score einsum and the softmax: elementwise, the scores as first operand
#: (``masked_fill``: the mask second, sliced with its chunk when it varies along the queries).
_ELEMENTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.tanh.default,
    aten.masked_fill.Scalar,
}
_ROW = 32  # queries per 64-byte fp16 row


@dataclass(frozen=True)
class AttentionChunksOptions:
    max_bytes: int = 2**20


@dataclass
class _Head:
    scores: torch.fx.Node  # einsum(SCORES, [q, k])
    chain: list[torch.fx.Node]  # elementwise ops from the scores to the softmax input
    softmax: torch.fx.Node
    out: torch.fx.Node  # einsum(WEIGHTED, [softmax, v])


def _is_einsum(node, equation: str) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target == aten.einsum.default
        and node.args[0] == equation
    )


def match_head(out: torch.fx.Node) -> _Head | None:
    """``einsum(WEIGHTED, [softmax(f(einsum(SCORES, [q, k])), 1), v])`` with single-use intermediates."""
    if not _is_einsum(out, WEIGHTED):
        return None
    w, _ = out.args[1]
    if w.op != "call_function" or w.target != aten._softmax.default or w.args[1] != 1 or len(w.users) != 1:
        return None
    chain = []
    x = w.args[0]
    while x.op == "call_function" and x.target in _ELEMENTWISE and len(x.users) == 1:
        chain.append(x)
        x = x.args[0]
    if not _is_einsum(x, SCORES) or len(x.users) != 1:
        return None
    chain.reverse()
    return _Head(x, chain, w, out)


def chunk_size(b: int, sk: int, sq: int, max_bytes: int) -> int | None:
    """The most queries per chunk keeping a (B, S_k, 1, chunk) fp16 score under ``max_bytes``."""
    if padded_bytes((b, sk, 1, sq)) <= max_bytes:
        return sq
    best = None
    lo, hi = 1, sq
    while lo <= hi:  # padded size grows with the chunk: binary search
        mid = (lo + hi) // 2
        if padded_bytes((b, sk, 1, mid)) <= max_bytes:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is not None and best >= _ROW:
        best -= best % _ROW
    return best


def _chunk_operand(x, sq: int, a: int, b: int, graph):
    """``x`` for queries [a, b): sliced when it varies along the (last) query axis."""
    s = shape(x) if isinstance(x, torch.fx.Node) else None
    if s and s[-1] == sq and sq > 1:
        return call(graph, aten.slice.Tensor, (x, len(s) - 1, a, b))
    return x


class AttentionChunks(Pass):
    __doc__ = __doc__
    name = "attention_chunks"
    runs_after = frozenset({"attention_bc1s"})
    Options = AttentionChunksOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats = {"chunked_heads": 0, "chunks": 0, "too_large": 0}
        for node in list(graph.nodes):
            head = match_head(node)
            if head is None:
                continue
            s = shape(head.scores)
            if s is None or len(s) != 4 or any(shape(n) != s for n in head.chain):
                continue
            b, sk, _, sq = s
            size = chunk_size(b, sk, sq, self.options.max_bytes)
            if size == sq:
                continue
            if size is None:  # even one query's scores are too large: chunking keys is not done
                stats["too_large"] += 1
                continue
            with provenance(head.out), graph.inserting_before(head.out):
                outs = [self._chunk(graph, head, sq, a, min(a + size, sq)) for a in range(0, sq, size)]
                merged = call(graph, aten.cat.default, (outs, 3))
            head.out.replace_all_uses_with(merged)
            stats["chunked_heads"] += 1
            stats["chunks"] += len(outs)
        if stats["chunked_heads"]:
            dce(graph)
        return finish(gm, bool(stats["chunked_heads"]), **stats)

    @staticmethod
    def _chunk(graph, head: _Head, sq: int, a: int, b: int) -> torch.fx.Node:
        q, k = head.scores.args[1]
        x = call(graph, aten.einsum.default, (SCORES, [call(graph, aten.slice.Tensor, (q, 3, a, b)), k]))
        for op in head.chain:
            rest = tuple(_chunk_operand(arg, sq, a, b, graph) for arg in op.args[1:])
            x = call(graph, op.target, (x, *rest), dict(op.kwargs))
        w = call(graph, aten._softmax.default, (x, *head.softmax.args[1:]))
        return call(graph, aten.einsum.default, (WEIGHTED, [w, head.out.args[1][1]]))
