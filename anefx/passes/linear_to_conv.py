"""``linear_to_conv`` — every projection by a weight becomes a 1x1 ``conv2d`` in (B, C, 1, S).

``linear`` and the linears in disguise (``matmul``/``mm``/``addmm``/``einsum`` with a parameter or
constant operand, e.g. ``x @ self.weight.T``) become a 1x1 convolution whose weight is the linear
weight *viewed* as ``(O, I, 1, 1)`` (no copy; coremltools folds the view into the constant). A
weight stored as (I, O), as in ``x @ W``, is transposed once (a constant, folded by coremltools).
The input is changed into (B, C, 1, S) and the result back; when the input already comes out of
(B, C, 1, S) (the previous projection), the pair cancels on the spot, and ``to_bc1s`` removes the
rest.

Original::

    %y = aten.linear(%x, %w, %b)                 # x: (B, S, I), w: (O, I)
Result::

    %x4 = aten.unsqueeze(aten.permute(%x, [0, 2, 1]), 2)        # (B, I, 1, S)
    %w4 = aten.view(%w, [O, I, 1, 1])                           # a view of w: no copy
    %c  = aten.conv2d(%x4, %w4, %b)                             # (B, O, 1, S)
    %y  = aten.permute(aten.squeeze(%c, 2), [0, 2, 1])          # (B, S, O)

A (B, I) input is viewed as (B, I, 1, 1) and the result squeezed back to (B, O). GPT-2's ``Conv1D``
(``addmm`` on the input flattened to (B*S, I), viewed back to (B, S, O)) and OPT's FFN (``linear``
on hidden states flattened to (B*S, I)) run on the (B, S, I) tensor directly, so they stay in
(B, C, 1, S) instead of becoming (B*S, C, 1, 1).

LM heads: a ``*ForCausalLM`` vocabulary projection is a projection like any other and becomes a
conv; its logits keep the model's own layout, (B, S, V) (the conv's (B, V, 1, S) is changed back
once, at the output). When the head's weight is tied to the input embedding, the embedding lookup
is made to read the conv's (V, C, 1, 1) view of the same tensor (``index_select`` on axis 0, viewed
back to (B, S, C)), so the converted program holds the table once instead of twice.

Options:
  min_channels: leave projections with fewer input channels than this alone (default 1: none)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.layout import RANKS
from anefx.analysis.layout_rules import BINARY, UNARY
from anefx.analysis.projections import Projection, emit_conv, match_projection
from anefx.ir.graph import call, dce, get_attr_value, is_constant, provenance, shape, views_to_reshapes
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearToConvOptions:
    min_channels: int = 1


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _flattened_sequence(node: torch.fx.Node, proj: Projection):
    """GPT-2's ``Conv1D``: ``view(addmm(b, view(x, [B*S, I]), W), [B, S, O])``. Returns (x, views
    back to (B, S, O)) so the projection runs on the (B, S, I) tensor, or None."""
    x = proj.x
    if x.op != "call_function" or x.target not in _VIEWS:
        return None
    x3, x3s, out = x.args[0], shape(x.args[0]), shape(node)
    if x3s is None or out is None or len(x3s) != 3 or x3s[0] * x3s[1] != shape(x)[0]:
        return None
    back = [u for u in node.users if u.op == "call_function" and u.target in _VIEWS]
    if len(back) != len(node.users) or any(shape(u) != (x3s[0], x3s[1], out[1]) for u in back):
        return None
    return x3, back


def _tensor_of(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = get_attr_value(gm, node)
    return value if isinstance(value, torch.Tensor) else None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
    )


def _share_tied_embeddings(gm: torch.fx.GraphModule) -> int:
    """Embedding lookups whose table is a conv weight (tied LM head) read the conv's (V, C, 1, 1)
    view, so the converted program stores the table once. Returns how many lookups changed."""
    graph = gm.graph
    views = []  # (tensor, the 4-D view node feeding a conv)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.view.default:
            t = _tensor_of(gm, node.args[0])
            feeds_conv = any(u.target == aten.conv2d.default and u.args[1] is node for u in node.users)
            if t is not None and t.dim() == 2 and feeds_conv and list(node.args[1]) == [*t.shape, 1, 1]:
                views.append((t, node))
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        table, ids = _tensor_of(gm, node.args[0]), node.args[1]
        ids_shape = shape(ids)
        if table is None or ids_shape is None or table.dim() != 2:
            continue
        view = next((v for t, v in views if _same_storage(t, table)), None)
        if view is None:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order[view] > order[node]:
            node.prepend(view)  # the view reads only the weight: move it before the lookup
        with graph.inserting_before(node), provenance(node):
            flat = call(graph, aten.view.default, (ids, [-1]))
            rows = call(graph, aten.index_select.default, (view, 0, flat))  # (N, C, 1, 1)
            out = call(graph, aten.view.default, (rows, [*ids_shape, table.shape[1]]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed += 1
    return changed


def _row_region(flat: torch.fx.Node, rows: int, batch: int, seq: int):
    """The row-wise ops computed on the flattened (B*S, C) tensor ``flat``, and the views that bring
    their results back to (B, S, C'); None when anything else reads the region."""
    region: list[torch.fx.Node] = []
    exits: list[torch.fx.Node] = []
    inside = {flat}
    queue = [flat]
    while queue:
        node = queue.pop()
        for user in node.users:
            if user in inside or user in exits:
                continue
            us = shape(user)
            if us is None or user.op != "call_function":
                return None
            if user.target in _VIEWS and user.args[0] is node and us == (batch, seq, shape(node)[-1]):
                exits.append(user)
            elif len(us) == 2 and us[0] == rows and len(region) < 64:
                inside.add(user)
                region.append(user)
                queue.append(user)
            else:
                return None
    if not exits or not region or not all(_row_wise(n, inside) for n in region):
        return None
    return region, exits


def _row_wise(node: torch.fx.Node, inside: set) -> bool:
    """Whether ``node`` treats each row of its (N, C) operands in ``inside`` on its own, so it
    computes the same on (B, S, C)."""
    t, args = node.target, node.args
    if t in (aten.linear.default, aten.matmul.default):
        return args[0] in inside and all(is_constant(a) for a in args[1:])
    if t == aten.layer_norm.default:
        return args[0] in inside and len(args[1]) == 1 and all(is_constant(a) for a in args[2:4])
    if t in UNARY:
        return args[0] in inside and all(not isinstance(a, torch.fx.Node) for a in args[1:])
    if t in BINARY and t != aten.where.self:
        tensors = [a for a in args if isinstance(a, torch.fx.Node)]
        return any(a in inside for a in tensors) and all(
            a in inside or (is_constant(a) and len(shape(a) or (0, 0)) <= 1) for a in tensors
        )
    return False


def _unflatten_rows(gm: torch.fx.GraphModule) -> int:
    """OPT's FFN: ``view(x, [B*S, C])`` → row-wise ops (layer_norm, linear, relu, residual add) →
    ``view(·, [B, S, C])``. The same ops run on the (B, S, C) tensor instead, so the projections
    become convs in (B, C, 1, S) and not (B*S, C, 1, 1). Returns how many regions changed."""
    graph = gm.graph
    changed = 0
    for flat in list(graph.nodes):
        if flat.op != "call_function" or flat.target not in _VIEWS or flat.graph is not graph:
            continue
        src = flat.args[0]
        ss, fs = shape(src), shape(flat)
        if ss is None or fs is None or len(ss) != 3 or fs != (ss[0] * ss[1], ss[2]):
            continue
        found = _row_region(flat, fs[0], ss[0], ss[1])
        if found is None:
            continue
        region, exits = found
        new = {flat: src}
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(region, key=order.__getitem__):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a, new=new: new.get(a, a))
            with graph.inserting_before(node), provenance(node):
                new[node] = call(graph, node.target, args, kwargs)
        for view in exits:
            view.replace_all_uses_with(new[view.args[0]])
            graph.erase_node(view)
        dce(graph)
        changed += 1
    return changed


class LinearToConv(Pass):
    __doc__ = __doc__
    name = "linear_to_conv"
    runs_after = frozenset({"canonicalize", "fold_constants", "grouped_projection"})
    Options = LinearToConvOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        unflattened = _unflatten_rows(gm)
        converted, skipped = 0, {}
        memo: dict = {}  # one layout change per input, shared by q/k/v-style siblings
        for node in list(graph.nodes):
            proj = match_projection(node)
            if proj is None:
                continue
            xs, ws = shape(proj.x), shape(proj.weight)
            flattened = _flattened_sequence(node, proj) if xs is not None and len(xs) == 2 else None
            if flattened is not None:
                proj.x, xs = flattened[0], shape(flattened[0])
            if xs is None or ws is None or len(xs) not in RANKS:
                skipped["rank"] = skipped.get("rank", 0) + 1
                continue
            if xs[-1] < self.options.min_channels:
                skipped["min_channels"] = skipped.get("min_channels", 0) + 1
                continue
            if not ctx.site(node):
                continue
            with graph.inserting_before(node), provenance(node):
                w = proj.weight
                out_in = (ws[1], ws[0]) if proj.weight_is_io else (ws[0], ws[1])
                if proj.weight_is_io:  # (I, O) -> (O, I): a transposed copy, folded by coremltools
                    w = call(graph, aten.clone.default, (call(graph, aten.t.default, (w,)),))
                    w.kwargs = {"memory_format": torch.contiguous_format}
                y = emit_conv(graph, proj.x, len(xs), w, out_in, proj.bias, memo=memo)
            if flattened is not None:
                for view in flattened[1]:
                    view.replace_all_uses_with(y)
                    graph.erase_node(view)
            node.replace_all_uses_with(y)
            views_to_reshapes(y)
            graph.erase_node(node)
            converted += 1
        tied = _share_tied_embeddings(gm) if converted else 0
        if converted:
            dce(graph)
        stats = {"converted": converted}
        stats.update({k: v for k, v in (("unflattened", unflattened), ("tied_embeddings", tied)) if v})
        stats.update({f"skipped_{k}": v for k, v in skipped.items()})
        return finish(gm, bool(converted or unflattened), **stats)
