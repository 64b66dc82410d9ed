"""``split_modulation`` — adaLN modulation vectors split on the channel axis, not as a token sequence.

Diffusion transformers modulate every block with vectors computed from the timestep: PixArt's and
Sana's ``AdaLayerNormSingle`` project the embedding to (B, k·C), view it as (B, k, C), add a learned
(1, k, C) table and chunk it into k vectors of shape (B, 1, C) (shift, scale, gate …). In ANE form a
(B, k, C) tensor is a sequence of k tokens, (B, C, 1, k): the view costs a reshape and a transpose
per block. Chunking the projection itself on its channel axis gives the same vectors with no data
movement: each (B, C) piece is (B, C, 1, 1) in ANE form, and so is its (B, 1, C) view.

Original::

    %r = aten.reshape(%e, [B, k, C])       # e: (B, k·C)
    %a = aten.add(%table, %r)              # elementwise ops with constants (1, k, C) or scalars
    %parts = aten.chunk(%a, k, 1)          # (or split(%a, 1, 1)): k pieces (B, 1, C)
    %m_i = getitem(%parts, i)
Result::

    %es = aten.split(%e, C, 1)             # k pieces (B, C): the channel axis of (B, C, 1, 1)
    %m_i = aten.add(aten.slice(%table, 1, i, i + 1), aten.unsqueeze(getitem(%es, i), 1))

The elementwise ops between the view and the chunk are repeated per piece, their constant operands
sliced on the k axis (coremltools folds the slices). Options: none.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from anefx.analysis.layout_rules import BINARY, UNARY
from anefx.ir.graph import call, dce, is_constant, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _pieces(split: torch.fx.Node, k: int) -> bool:
    """Whether ``split`` cuts axis 1 of its (B, k, C) input into k pieces of one row each."""
    if split.target == aten.chunk.default:
        n, dim = split.args[1], split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    elif split.target == aten.split.Tensor:
        size = split.args[1]
        n, dim = (k if size == 1 else -1), split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    else:
        return False
    return n == k and dim % 3 == 1 and all(u.target is operator.getitem for u in split.users)


def _match(reshape: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node] | None:
    """(elementwise chain from the reshape to the split, the split) when ``reshape`` starts the pattern."""
    if reshape.op != "call_function" or reshape.target not in _RESHAPES:
        return None
    before, after = shape(reshape.args[0]), shape(reshape)
    if before is None or after is None or len(before) != 2 or len(after) != 3 or after[0] != before[0]:
        return None
    k = after[1]
    if k < 2 or after[1] * after[2] != before[1]:
        return None
    chain, node = [], reshape
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function":
            return None
        if user.target in (aten.chunk.default, aten.split.Tensor):
            return (chain, user) if user.args[0] is node and _pieces(user, k) else None
        if shape(user) != after:
            return None
        if user.target in UNARY and user.args[0] is node:
            chain.append(user)
        elif user.target in BINARY and len(BINARY[user.target]) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, torch.fx.Node) and not is_constant(other):
                return None
            chain.append(user)
        else:
            return None
        node = user
    return None


def _row(graph: torch.fx.Graph, operand, i: int, k: int):
    """Row ``i`` of a constant operand broadcasting against (B, k, C) (scalars and unit rows as they are)."""
    s = shape(operand) if isinstance(operand, torch.fx.Node) else None
    if s is None or len(s) < 2 or s[-2] == 1:
        return operand
    assert s[-2] == k
    return call(graph, aten.slice.Tensor, (operand, len(s) - 2, i, i + 1))


class SplitModulation(Pass):
    __doc__ = __doc__
    name = "split_modulation"
    runs_after = frozenset({"canonicalize", "fold_constants"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        found = [(n, m) for n in graph.nodes if (m := _match(n)) is not None]
        for node, (chain, split) in found:
            if not ctx.site(node):
                continue
            _, k, c = shape(node)
            with graph.inserting_before(split), provenance(node):
                pieces = call(graph, aten.split.Tensor, (node.args[0], c, 1))
                rows = []
                for i in range(k):
                    x = call(graph, aten.unsqueeze.default, (call(graph, operator.getitem, (pieces, i)), 1))
                    prev = node
                    for op in chain:
                        args = [x if a is prev else _row(graph, a, i, k) for a in op.args]
                        x = call(graph, op.target, tuple(args), dict(op.kwargs))
                        prev = op
                    rows.append(x)
            for user in list(split.users):
                user.replace_all_uses_with(rows[user.args[1]])
            dce(graph)
            rewritten += 1
        return finish(gm, bool(rewritten), rewritten=rewritten)
