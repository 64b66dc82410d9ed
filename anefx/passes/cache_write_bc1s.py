"""``cache_write_bc1s`` — per-head work merged back channels-first, computed on channel chunks.

A KV cache in the ANE layout holds each layer's keys as (B, H·D, 1, S) (see :mod:`anefx.lm.cache`):
the model's (B, H, S, D) keys, after rotary, are merged back channels-first before they are written,
``reshape(transpose(rotary(k), 2, 3), [B, H·D, 1, S])``. Spelled that way, the merge is a layout
change of every key. This pass computes what the write reads head by head on the projection's
(B, D, 1, S) channel chunks instead (the per-head program is the attention pass's: rotary,
QK-norm, casts, see :mod:`anefx.analysis.head_program`) and concatenates the heads on channels, so
the cache write needs no layout change; heads that are plain channel blocks are the projection
itself. A merge of anything else (an attention output, a tensor whose heads are not channel
blocks of a projection) is left alone.

The cos/sin tables in chunk layout are shared with the attention pass when it runs later: it finds
them before its sites and reuses them.

Original::

    %k = aten.transpose(aten.view(%k_proj, [B, S, H, D]), 1, 2)             # (B, H, S, D)
    %r = %k * %cos + aten.cat([-%k[..., D/2:], %k[..., :D/2]], -1) * %sin     # rotary
    %w = aten.reshape(aten.transpose(%r, 2, 3), [B, H*D, 1, S])               # what the cache write reads
Result::

    %k_h = split(to_bc1s(%k_proj), D, 1)[h]                                   # (B, D, 1, S), per head h
    %r_h = %k_h * %cos_bc + aten.cat([-%k_h[:, D/2:], %k_h[:, :D/2]], 1) * %sin_bc
    %w = aten.cat([%r_0, …, %r_{H-1}], 1)                                     # (B, H·D, 1, S): no layout change

Options: none.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from anefx.analysis.head_program import HeadProgram, channel_order, trace_program
from anefx.analysis.head_replay import HeadReplay
from anefx.analysis.heads import MOVEMENT, Heads, movement_chain, simulate, trace_heads
from anefx.analysis.projections import match_projection
from anefx.ir.graph import call, dce, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
Node = torch.fx.Node
_CONVS = {aten.conv2d.default, aten.convolution.default}


def channels_first_merge(node: Node) -> Node | None:
    """The (B, H, S, D) head tensor that ``node`` (data movement only) merges channels-first, into
    (B, H·D, 1, S) or (B, H·D, S) with channel ``h·D + d``: how a KV cache in the ANE layout is
    written. None for anything else. The head tensor is the first of the movement chain ending at
    ``node`` from which the rest of the chain is that merge (so a head sliced out of a fused QKV
    projection is found below the slice). Reads recorded shapes only (never infers one)."""
    if node.op != "call_function" or node.target not in MOVEMENT or not node.users:
        return None
    s = _recorded_shape(node)
    if s is None or len(s) not in (3, 4) or (len(s) == 4 and s[2] != 1):
        return None
    found = movement_chain(node)
    if found is None or not found[1]:
        return None
    src, chain = found
    for i, head in enumerate([src, *chain[:-1]]):
        hs = _recorded_shape(head)
        if hs is None or len(hs) != 4 or hs[3] == 1 or (s[0], s[1], s[-1]) != (hs[0], hs[1] * hs[3], hs[2]):
            continue  # (a head of one channel is no head: a (B, C, 1, 1) tensor moved as itself)
        idx = torch.arange(math.prod(hs)).reshape(hs)
        try:
            r = simulate(chain[i:], idx)
        except Exception:
            continue
        if torch.equal(r, idx.permute(0, 1, 3, 2).reshape(s)):
            return head
    return None


def projected(found: Heads | HeadProgram) -> bool:
    """Whether the heads a write reads are channel blocks of a projection (for a per-head
    program: one of its leaves). Anything else (a model input, a cos/sin table already in chunk
    layout) merged channels-first is a layout change either way: left alone."""
    leaves = [found] if isinstance(found, Heads) else [s.heads for s in found.steps.values() if s.heads is not None]
    return any(
        h.lift is not None or h.source.target in _CONVS or match_projection(h.source) is not None for h in leaves
    )


def _recorded_shape(node: Node) -> tuple[int, ...] | None:
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


class CacheWriteBC1S(Pass):
    __doc__ = __doc__
    name = "cache_write_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants", "linear_to_conv"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        replay = HeadReplay(gm)
        merged_sources: set[Node] = set()
        for node in list(graph.nodes):  # in graph order: what a site creates is reused only by later sites
            src = channels_first_merge(node)
            if src is None or src in merged_sources:
                continue
            found = trace_heads(src) or trace_program(src)
            if isinstance(found, str) or not projected(found) or not ctx.site(node):
                continue
            with provenance(node), graph.inserting_before(node):
                order = channel_order(found) if isinstance(found, HeadProgram) else None
                heads, _ = replay.materialise(found, order, None, node)  # None: the model's channel order
                merged = replay.merged(heads, shape(src)[1])
                if len(shape(node)) == 3:
                    merged = call(graph, aten.view.default, (merged, list(shape(node))))
            node.replace_all_uses_with(merged)
            merged_sources.add(src)
        if merged_sources:
            dce(graph)
        return finish(gm, bool(merged_sources), merges=len(merged_sources))
