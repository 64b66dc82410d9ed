"""``canonicalize`` — remove no-ops and spell ops the way converters understand them.

torch.export keeps inference no-ops and some spellings that coremltools 9 cannot convert (for example
``new_ones`` and ``__and__`` from transformers 5.x attention-mask code). This pass rewrites them into
plain ATen, without changing any value.

Original::

    %d = aten.dropout(%x, 0.1, False)                     # train=False: identity
    %c = aten.clone(%d)
    %t = aten._assert_tensor_metadata(%m, dtype=int64)    # a check with no users
    %o = aten.new_ones(%m, [1, 128], dtype=bool)
    %a = aten.__and__(%o, %b)
    %w = aten.where.ScalarOther(%c, %x, -inf)
    %i = aten.add_(%tmp, %j)                              # in place on a temporary no one reads again
    %k = aten.index(%qkv, [None, None, %last_but_one])    # a constant index [-2] (one head): a gather
    %e = aten.broadcast_to(%k, [B, S, G, D])
    %r = aten.cat([%rotated, %nothing], -1)               # %nothing: (B, H, S, 0), a partial rotary's rest
    %p = aten.einsum("nhwpqc->nchpwq", [%u])              # one operand, only permuted (DiT's unpatchify)
    %n = aten.rms_norm(%h, [C], %g, None)                 # eps None: coremltools needs a number
Result::

    %o = aten.ones([1, 128], dtype=bool)
    %a = aten.logical_and(%o, %b)                         # uses %x where %c was used
    %w = aten.masked_fill(%x, aten.logical_not(%c), -inf)
    %i = aten.add(%tmp, %j)
    %k = aten.slice(%qkv, 2, H, H + 1, 1)                 # uses %rotated where %r was used
    %e = aten.expand(%k, [B, S, G, D])
    %p = aten.permute(%u, [0, 5, 1, 3, 2, 4])             # one MIL transpose, as coremltools makes it
    %n = aten.rms_norm(%h, [C], %g, 1.1920928955078125e-07)  # torch.finfo(dtype).eps, what None means

Options: none.
"""

from __future__ import annotations

import torch
import torch.fx

from anefx.analysis.legalize import aliases
from anefx.analysis.transposes import einsum_permutation
from anefx.compat.torch import is_op_overload, op_schema, overload_name
from anefx.ir.graph import call, dtype, eval_constant, is_constant, node_arg, replace_node, shape
from anefx.ir.sites import SiteFilter, every_site
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten

_CHECKS = {aten._assert_tensor_metadata.default, aten._assert_async.msg, aten._assert_scalar.default}
_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_BITWISE = {
    aten.__and__.Tensor: (aten.logical_and.default, aten.bitwise_and.Tensor),
    aten.__or__.Tensor: (aten.logical_or.default, aten.bitwise_or.Tensor),
    aten.__xor__.Tensor: (aten.logical_xor.default, aten.bitwise_xor.Tensor),
}
_NEW_FILLED = {aten.new_ones.default: 1, aten.new_zeros.default: 0}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_RESPELLED = {aten.where.ScalarOther, aten.broadcast_to.default}


def _same_value(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    return isinstance(src, torch.fx.Node) and dtype(node) == dtype(src) and shape(node) == shape(src)


def _is_identity(node: torch.fx.Node) -> bool:
    """Inference dropout, and clones/aliases/casts/views that keep shape and dtype."""
    t = node.target
    if t == aten.dropout.default:
        return len(node.args) < 3 or node.args[2] is False
    if t in _IDENTITY or t in _CASTS:
        return _same_value(node, node.args[0]) and not node.kwargs.get("memory_format")
    if t in _VIEWS:  # x.view(x.shape) (Falcon's scores and weights, viewed to the shape they have)
        return _same_value(node, node.args[0])
    return False


def _index_is_reshape(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """``x[i0, i1, …]`` with constant index grids that only reshape ``x`` (a gather that moves nothing).

    transformers 5.x builds its padding mask as ``mask[batch_idx, kv_idx]`` with ``arange`` grids;
    for static shapes that is ``mask.view(B, 1, 1, S)``, which needs no gather on the ANE.
    """
    src, indices = node.args[0], node.args[1]
    src_shape, out_shape = shape(src), shape(node)
    if src_shape is None or out_shape is None or not all(i is None or is_constant(i) for i in indices):
        return False
    numel = 1
    for d in src_shape:
        numel *= d
    try:
        idx = torch.arange(numel).reshape(src_shape)
        values = [None if i is None else eval_constant(gm, i) for i in indices]
        picked = idx[tuple(slice(None) if v is None else v for v in values)]
    except Exception:
        return False
    return picked.numel() == numel and torch.equal(picked.reshape(-1), torch.arange(numel))


def _functional_variant(node: torch.fx.Node):
    """``aten.add_.Tensor`` → ``aten.add.Tensor`` when the mutated value is a temporary no one reads
    afterwards (so the in-place write is invisible); None otherwise."""
    t = node.target
    if not is_op_overload(t) or not node.args:
        return None
    schema = op_schema(t)
    if not schema.arguments or not (schema.arguments[0].alias_info and schema.arguments[0].alias_info.is_write):
        return None
    base = schema.name.split("::")[-1]
    if not base.endswith("_"):
        return None
    target = node.args[0]
    if not isinstance(target, torch.fx.Node) or target.op != "call_function":
        return None  # an input or a buffer: the write is visible outside
    if aliases(target) or any(aliases(u) for u in target.users if u is not node):
        return None  # a view of another tensor, or viewed by another node: the write is visible there
    if any(u > node for u in target.users):  # fx nodes compare by their position in the graph
        return None
    packet = getattr(torch.ops.aten, base[:-1], None)
    return getattr(packet, overload_name(t), None) if packet is not None else None


def _index_as_slice(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, int, int, int] | None:
    """``x[..., [a, a+k, …], …]``: one constant 1-D index, an arithmetic progression with a positive
    step, on one axis (Falcon's ``fused_qkv[..., [-2], :]``) is ``slice(x, axis, start, stop, step)``,
    which moves no data on the ANE, where a gather would. Returns (axis, start, stop, step) or None."""
    src, indices = node.args[0], node.args[1]
    src_shape = shape(src)
    given = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if src_shape is None or len(given) != 1 or not is_constant(given[0][1]):
        return None
    axis, index = given[0]
    try:
        values = torch.as_tensor(eval_constant(gm, index))
    except Exception:
        return None
    size = src_shape[axis]
    if values.dim() != 1 or not len(values) or values.dtype not in (torch.int32, torch.int64):
        return None
    values = [int(v) % size if -size <= int(v) < size else None for v in values]
    step = values[1] - values[0] if len(values) > 1 else 1
    if None in values or step <= 0 or values != list(range(values[0], values[-1] + 1, step)):
        return None
    return axis, values[0], values[-1] + 1, step


def _has_empty_operand(node: torch.fx.Node) -> bool:
    return any(s is not None and 0 in s for s in map(shape, node.args[0]))


def _drop_empty_cat_operands(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """``cat([empty, x])`` → ``cat([x])``: a size-0 operand (1-D, which ``cat`` skips, as transformers'
    ``DynamicCache`` starts from; or empty on the concatenated axis, as a partial rotary's pass-through
    of nothing) adds nothing. A ``cat`` of a single operand of the result's shape → that operand.
    Returns whether the node changed."""
    tensors = node.args[0]
    keep = [a for a in tensors if shape(a) is not None and 0 not in shape(a)]
    if len(keep) == len(tensors) or not keep or any(shape(a) is None for a in tensors):
        return False
    if len(keep) == 1 and shape(keep[0]) == shape(node) and dtype(keep[0]) == dtype(node):
        replace_node(graph, node, keep[0])
    else:
        node.args = (keep, *node.args[1:])
    return True


def canonicalize(gm: torch.fx.GraphModule, site: SiteFilter = every_site) -> dict[str, int]:
    """Remove no-ops and respell ops converters reject; return counts of what changed.

    Each rewritten node is a site (``site(node)`` says whether it may be rewritten)."""
    stats = {"checks_removed": 0, "identities_removed": 0, "ops_respelled": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not _candidate(gm, node) or not site(node):
            continue
        functional = _functional_variant(node)
        if functional is not None:
            node.target = functional
            stats["ops_respelled"] += 1
        t = node.target
        if t in _CHECKS and not node.users:
            graph.erase_node(node)
            stats["checks_removed"] += 1
        elif _is_identity(node):
            if t in (aten.contiguous.default, aten.clone.default):  # x.contiguous().view(…) on a permuted x
                for user in node.users:
                    if user.op == "call_function" and user.target == aten.view.default:
                        user.target = aten.reshape.default
            replace_node(graph, node, node.args[0])
            stats["identities_removed"] += 1
        elif t in _BITWISE:
            logical, bitwise = _BITWISE[t]
            node.target = logical if dtype(node) == torch.bool else bitwise
            stats["ops_respelled"] += 1
        elif t in _NEW_FILLED:
            src, size = node.args[0], node.args[1]
            kwargs = {
                "dtype": node.kwargs.get("dtype") or dtype(src),
                "device": node.kwargs.get("device") or getattr(src.meta.get("val"), "device", None),
            }
            with graph.inserting_before(node):
                new = call(graph, aten.full.default, (list(size), _NEW_FILLED[t]), kwargs)
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
        elif t == aten.index.Tensor and _index_is_reshape(gm, node):
            with graph.inserting_before(node):
                new = call(graph, aten.view.default, (node.args[0], list(shape(node))))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
        elif t == aten.index.Tensor and _index_as_slice(gm, node) is not None:
            axis, start, stop, step = _index_as_slice(gm, node)
            with graph.inserting_before(node):
                new = call(graph, aten.slice.Tensor, (node.args[0], axis, start, stop, step))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
        elif t == aten.einsum.default and einsum_permutation(node) is not None:
            with graph.inserting_before(node):
                new = call(graph, aten.permute.default, (node.args[1][0], einsum_permutation(node)))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
        elif t == aten.rms_norm.default and node_arg(node, 3, "eps") is None:  # coremltools needs the eps
            eps = torch.finfo(dtype(node.args[0])).eps  # what aten.rms_norm uses for None
            node.args, node.kwargs = (*node.args[:2], node_arg(node, 2, "weight"), eps), {}
            stats["ops_respelled"] += 1
        elif t == aten.cat.default and _drop_empty_cat_operands(graph, node):
            stats["identities_removed"] += 1
        elif t == aten.broadcast_to.default:  # the same as expand (Falcon's K/V heads of a group)
            node.target = aten.expand.default
            stats["ops_respelled"] += 1
        elif t == aten.where.ScalarOther:  # where(c, x, s) == masked_fill(x, ~c, s)
            cond, x, scalar = node.args
            with graph.inserting_before(node):
                inv = call(graph, aten.logical_not.default, (cond,))
                new = call(graph, aten.masked_fill.Scalar, (x, inv, scalar))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
    return stats


def _candidate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether :func:`canonicalize` would rewrite ``node`` (asked before declaring it a site)."""
    t = node.target
    if _functional_variant(node) is not None or _is_identity(node):
        return True
    if (t in _CHECKS and not node.users) or t in _BITWISE or t in _NEW_FILLED or t in _RESPELLED:
        return True
    if t == aten.cat.default:
        return _has_empty_operand(node)
    if t == aten.einsum.default:
        return einsum_permutation(node) is not None
    if t == aten.rms_norm.default:
        return node_arg(node, 3, "eps") is None
    return t == aten.index.Tensor and (_index_is_reshape(gm, node) or _index_as_slice(gm, node) is not None)


class Canonicalize(Pass):
    __doc__ = __doc__
    name = "canonicalize"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = canonicalize(gm, ctx.site)
        return finish(gm, any(stats.values()), **stats)
