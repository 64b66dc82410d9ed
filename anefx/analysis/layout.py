"""The (B, C, 1, S) layout vocabulary shared by the ANE passes.

A channels-last activation of rank 3, ``(B, S, C)``, lives on the ANE as ``(B, C, 1, S)``; one of rank
2, ``(B, C)``, as ``(B, C, 1, 1)``. This module spells the two layout changes in ATen, recognises
them in a graph, and maps axes and shapes between the layouts:

=========  ===========================================  ===========================================
rank       to (B, C, 1, S)                              from (B, C, 1, S)
=========  ===========================================  ===========================================
3          ``unsqueeze(permute(x, [0, 2, 1]), 2)``      ``permute(squeeze(y, 2), [0, 2, 1])``
2          ``unsqueeze(unsqueeze(x, 2), 3)``            ``squeeze(y, [2, 3])``
4          ``permute(x, [0, 3, 1, 2])``                 ``permute(y, [0, 2, 3, 1])``
=========  ===========================================  ===========================================

Rank 4 is the image case: a channels-last (B, H, W, C) tensor (ConvNeXt's LayerNorm and Linear
blocks) lives channels-first as (B, C, H, W), the layout of the convolutions around it.

Every layout change anefx inserts is tagged ``node.meta["anefx_layout"] = "to_bc1s" | "from_bc1s"``
on its last node, so graphs stay readable and the ANE report can point at them.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from anefx.ir.graph import call, insert_after, is_constant, shape

aten = torch.ops.aten


def padding_factor(shape: tuple[int, ...] | None, itemsize: int = 2) -> float:
    """How much larger a tensor is on the ANE, whose last axis is padded to 64 bytes."""
    if not shape:
        return 1.0
    last = shape[-1] * itemsize
    return (math.ceil(last / 64) * 64) / last if last else 1.0


def padded_bytes(shape: tuple[int, ...] | None, itemsize: int = 2) -> int:
    """Bytes of a tensor on the ANE (fp16 by default), its last axis padded to 64 bytes."""
    if not shape:
        return itemsize
    n = math.prod(shape) * itemsize
    return int(n * padding_factor(shape, itemsize))


def moves_data(before: tuple[int, ...], after: tuple[int, ...], perm: list[int] | None = None) -> bool:
    """Whether a reshape (``perm`` None) or transpose (``perm``) from ``before`` to ``after`` copies
    memory on the ANE, predicted from its layout: row-major, the last axis padded to 64 bytes.

    A transpose that keeps the order of the non-unit axes is a reshape. A reshape copies nothing when
    it keeps the last axis (rows stay rows: GroupNorm's (B, C, H, W) -> (B, G, C/G·H, W)), or when
    neither side pads its last axis (both dense: (B, C, H, W) -> (B, C, 1, H·W) with W·2 bytes a
    multiple of 64, the hand-over between a UNet's convolutions and its transformer blocks)."""
    if not before or not after:
        return False
    if perm is not None:
        kept = [p for p in perm if before[p] != 1]
        if kept != sorted(kept):
            return True
    if before[-1] == after[-1]:
        return False
    return padding_factor(before) != 1.0 or padding_factor(after) != 1.0


TAG = "anefx_layout"
RANKS = (2, 3, 4)
#: ranks whose layout ``to_bc1s`` chooses globally; rank-4 (image) changes are local permutes that
#: ``fold_transposes`` cancels against the model's own permutes
GLOBAL_RANKS = (2, 3)

#: orig axis -> bc1s axis, per orig rank
_AXIS = {3: {0: 0, 1: 3, 2: 1}, 2: {0: 0, 1: 1}, 4: {0: 0, 1: 2, 2: 3, 3: 1}}


def bc1s_axis(rank: int, axis: int) -> int:
    """The (B, C, 1, S) axis holding original axis ``axis`` of a rank-``rank`` channels-last tensor."""
    return _AXIS[rank][axis % rank]


def bc1s_shape(shp: tuple[int, ...]) -> tuple[int, ...]:
    if len(shp) == 3:
        b, s, c = shp
        return (b, c, 1, s)
    if len(shp) == 2:
        b, c = shp
        return (b, c, 1, 1)
    if len(shp) == 4:
        b, h, w, c = shp
        return (b, c, h, w)
    raise ValueError(f"no (B, C, 1, S) form for rank {len(shp)}")


def _tag(node: torch.fx.Node, kind: str, rank: int) -> torch.fx.Node:
    node.meta[TAG] = kind
    node.meta["anefx_rank"] = rank
    return node


def emit_to_bc1s(graph: torch.fx.Graph, x: torch.fx.Node, rank: int) -> torch.fx.Node:
    """Insert (after ``x``'s current insertion point) the change of ``x`` into (B, C, 1, S)."""
    if rank == 3:
        p = call(graph, aten.permute.default, (x, [0, 2, 1]))
        return _tag(call(graph, aten.unsqueeze.default, (p, 2)), "to_bc1s", 3)
    if rank == 2:
        u = call(graph, aten.unsqueeze.default, (x, 2))
        return _tag(call(graph, aten.unsqueeze.default, (u, 3)), "to_bc1s", 2)
    if rank == 4:
        return _tag(call(graph, aten.permute.default, (x, [0, 3, 1, 2])), "to_bc1s", 4)
    raise ValueError(f"no (B, C, 1, S) form for rank {rank}")


def emit_from_bc1s(graph: torch.fx.Graph, y: torch.fx.Node, rank: int) -> torch.fx.Node:
    """Insert the change of a (B, C, 1, S) tensor ``y`` back to its rank-``rank`` channels-last form."""
    if rank == 3:
        s = call(graph, aten.squeeze.dim, (y, 2))
        return _tag(call(graph, aten.permute.default, (s, [0, 2, 1])), "from_bc1s", 3)
    if rank == 2:
        return _tag(call(graph, aten.squeeze.dims, (y, [2, 3])), "from_bc1s", 2)
    if rank == 4:
        return _tag(call(graph, aten.permute.default, (y, [0, 2, 3, 1])), "from_bc1s", 4)
    raise ValueError(f"no (B, C, 1, S) form for rank {rank}")


def _is(node, target, *args) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target != target:
        return False
    return all(a is None or _eq(node.args[i] if i < len(node.args) else None, a) for i, a in enumerate(args))


def _eq(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def match_to_bc1s(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """If ``node`` ends a layout change into (B, C, 1, S), return (its channels-last input, rank)."""
    if _is(node, aten.unsqueeze.default, None, 2):
        p = node.args[0]
        if _is(p, aten.permute.default, None, [0, 2, 1]):
            return p.args[0], 3
    if _is(node, aten.unsqueeze.default, None, 3):
        u = node.args[0]
        if _is(u, aten.unsqueeze.default, None, 2):
            x = u.args[0]
            s = shape(x)
            if (s is None or len(s) == 2) and not is_constant(x):
                return x, 2
    return None


def match_from_bc1s(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """If ``node`` ends a layout change out of (B, C, 1, S), return (its (B, C, 1, S) input, rank)."""
    if _is(node, aten.permute.default, None, [0, 2, 1]):
        s = node.args[0]
        if _is(s, aten.squeeze.dim, None, 2):
            return s.args[0], 3
    if _is(node, aten.squeeze.dims, None, [2, 3]):
        y = node.args[0]
        s = shape(y)
        if s is None or (len(s) == 4 and s[2] == 1 and s[3] == 1):
            return y, 2
    return None


def _anchor(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """Where to insert code that uses ``node``: after it, or after the last input if it is one."""
    if node.op != "placeholder":
        return node
    last = node
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def _change(graph, node, rank, memo, undo, emit) -> torch.fx.Node:
    """A layout change of ``node``: undoes the opposite change when ``node`` is one (``undo``),
    reuses a memoised change, or inserts one right after ``node`` (``emit``)."""
    m = undo(node)
    if m is not None and m[1] == rank:
        return m[0]
    # one (B, C, 1, 1) node can stand for a rank-2 (B, C) and a rank-3 (B, 1, C) value: memoise by rank
    if memo is not None and (node, rank) in memo:
        return memo[(node, rank)]
    with insert_after(graph, _anchor(graph, node)):
        out = emit(graph, node, rank)
    if memo is not None:
        memo[(node, rank)] = out
    return out


def to_bc1s(graph: torch.fx.Graph, x: torch.fx.Node, rank: int, memo: dict | None = None) -> torch.fx.Node:
    """``x`` in (B, C, 1, S): reuses the source of a layout change out of it, or a memoised change."""
    return _change(graph, x, rank, memo, match_from_bc1s, emit_to_bc1s)


def from_bc1s(graph: torch.fx.Graph, y: torch.fx.Node, rank: int, memo: dict | None = None) -> torch.fx.Node:
    """``y`` back in its channels-last form (the mirror of :func:`to_bc1s`)."""
    return _change(graph, y, rank, memo, match_to_bc1s, emit_from_bc1s)


def broadcast_to_bc1s(graph: torch.fx.Graph, operand: torch.fx.Node, out_rank: int) -> torch.fx.Node:
    """Map an operand that *broadcasts* against a rank-``out_rank`` channels-last value into (B, C, 1, S).

    A lower-rank operand is first given leading size-1 axes (right-aligned broadcasting), then changed
    like a full value. For parameters and constants coremltools folds all of it into the constant.
    """
    s = shape(operand)
    if s is None:
        raise ValueError(f"%{operand.name} has no shape metadata")
    if len(s) == 0 or (len(s) < out_rank and all(d == 1 for d in s)):
        return operand  # a scalar-like tensor broadcasts the same in both layouts
    x = operand
    if len(s) < out_rank:
        with insert_after(graph, _anchor(graph, operand)):
            x = call(graph, aten.view.default, (operand, [1] * (out_rank - len(s)) + list(s)))
    return to_bc1s(graph, x, out_rank)
