"""Graph legalization shared by the cleanup passes and the targets.

These rewrites keep every value as it is and only change how the graph is spelled (no-ops removed,
ops converters reject respelled, input-independent subgraphs evaluated). They live below both the
passes and the targets so each can use them without knowing the other.
"""

from __future__ import annotations

import torch
import torch.fx

from anefx.compat.torch import is_op_overload, op_schema, overload_name
from anefx.ir.graph import (
    add_constant,
    call,
    dce,
    dtype,
    eval_constant,
    get_attr_value,
    is_constant,
    replace_node,
    shape,
    walk_args,
)
from anefx.ir.sites import SiteFilter, every_site

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


def _same_value(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    return isinstance(src, torch.fx.Node) and dtype(node) == dtype(src) and shape(node) == shape(src)


def _is_identity(node: torch.fx.Node) -> bool:
    """Inference dropout, and clones/aliases/casts that keep shape and dtype."""
    t = node.target
    if t == aten.dropout.default:
        return len(node.args) < 3 or node.args[2] is False
    if t in _IDENTITY or t in _CASTS:
        return _same_value(node, node.args[0]) and not node.kwargs.get("memory_format")
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


def einsum_permutation(node: torch.fx.Node) -> list[int] | None:
    """The permutation a one-operand ``einsum`` applies (``'nhwpqc->nchpwq'``: DiT's unpatchify), or
    None when ``node`` is not such an einsum. coremltools converts it to one MIL ``transpose``."""
    if node.op != "call_function" or node.target != aten.einsum.default or len(node.args) < 2:
        return None
    eq, operands = node.args[0], node.args[1]
    if not isinstance(eq, str) or len(operands) != 1 or "->" not in eq or "." in eq:
        return None
    src, dst = (part.replace(" ", "") for part in eq.split("->"))
    if len(set(src)) != len(src) or sorted(src) != sorted(dst):
        return None
    return [src.index(c) for c in dst]


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s result may share memory with one of its inputs (a view, ``getitem``…)."""
    t = node.target
    if not is_op_overload(t):
        return node.op == "call_function"  # getitem of a multi-output op and the like: assume so
    return any(r.alias_info is not None for r in op_schema(t).returns)


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
    if _aliases(target) or any(_aliases(u) for u in target.users if u is not node):
        return None  # a view of another tensor, or viewed by another node: the write is visible there
    if any(u > node for u in target.users):  # fx nodes compare by their position in the graph
        return None
    packet = getattr(torch.ops.aten, base[:-1], None)
    return getattr(packet, overload_name(t), None) if packet is not None else None


def _drop_empty_cat_operands(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """``cat([empty, x])`` (a 1-D size-0 operand, which ``cat`` skips; transformers' ``DynamicCache``
    starts from one) → ``cat([x])``, and a ``cat`` of a single operand of the result's shape → that
    operand. Returns whether the node changed."""
    tensors = node.args[0]
    keep = [a for a in tensors if shape(a) != (0,)]
    if len(keep) == len(tensors) or not keep:
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
        elif t == aten.einsum.default and einsum_permutation(node) is not None:
            with graph.inserting_before(node):
                new = call(graph, aten.permute.default, (node.args[1][0], einsum_permutation(node)))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
        elif t == aten.rms_norm.default and _arg(node, 3, "eps") is None:  # coremltools needs the eps
            eps = torch.finfo(dtype(node.args[0])).eps  # what aten.rms_norm uses for None
            node.args, node.kwargs = (*node.args[:2], _arg(node, 2, "weight"), eps), {}
            stats["ops_respelled"] += 1
        elif t == aten.cat.default and _drop_empty_cat_operands(graph, node):
            stats["identities_removed"] += 1
        elif t == aten.where.ScalarOther:  # where(c, x, s) == masked_fill(x, ~c, s)
            cond, x, scalar = node.args
            with graph.inserting_before(node):
                inv = call(graph, aten.logical_not.default, (cond,))
                new = call(graph, aten.masked_fill.Scalar, (x, inv, scalar))
            replace_node(graph, node, new, keep_meta=True)
            stats["ops_respelled"] += 1
    return stats


def _arg(node: torch.fx.Node, index: int, name: str):
    """Argument ``name`` of ``node``, given by position ``index`` or by keyword (None when absent)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _candidate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether :func:`canonicalize` would rewrite ``node`` (asked before declaring it a site)."""
    t = node.target
    if _functional_variant(node) is not None or _is_identity(node):
        return True
    if (t in _CHECKS and not node.users) or t in _BITWISE or t in _NEW_FILLED or t == aten.where.ScalarOther:
        return True
    if t == aten.einsum.default:
        return einsum_permutation(node) is not None
    if t == aten.rms_norm.default:
        return _arg(node, 3, "eps") is None
    return t == aten.index.Tensor and _index_is_reshape(gm, node)


def _is_pure(node: torch.fx.Node) -> bool:
    target = node.target
    if not is_op_overload(target):
        return False
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = op_schema(target)
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    return bool(schema.returns)


def _writes(node: torch.fx.Node) -> bool:
    t = node.target
    if not is_op_overload(t) or not op_schema(t).arguments:
        return False
    alias = op_schema(t).arguments[0].alias_info
    return alias is not None and alias.is_write


def mutated_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose memory an in-place op writes: its target, the tensors it is a view of, and
    every view of those (the write is visible through all of them)."""
    seeds = [n.args[0] for n in graph.nodes if n.op == "call_function" and _writes(n) and n.args]
    seen: set[torch.fx.Node] = set()
    stack = [s for s in seeds if isinstance(s, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and _aliases(n) and n.args and isinstance(n.args[0], torch.fx.Node):
            stack.append(n.args[0])  # the base it views
        stack.extend(u for u in n.users if u.op == "call_function" and (_aliases(u) or _writes(u)))
    return seen


def mutated_buffers(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the buffers the graph writes into (a KV cache updated in place, a step counter …)."""
    return {n.target for n in mutated_nodes(gm.graph) if n.op == "get_attr"}


def fold_constants(gm: torch.fx.GraphModule, max_numel: int = 1 << 20, site: SiteFilter = every_site) -> int:
    """Replace input-independent subgraphs (not reading parameters) by constant buffers; return count.

    Each folded frontier node is a site (``site(node)`` says whether it may be folded)."""
    values: dict[torch.fx.Node, object] = {}
    mutated = mutated_nodes(gm.graph)
    mutated_names = {n.target for n in mutated if n.op == "get_attr"}  # other get_attr nodes of them too
    for node in gm.graph.nodes:
        if node in mutated:
            continue  # written in place (itself or through a view): its value changes during a run
        if node.op == "get_attr":
            value = get_attr_value(gm, node)
            if node.target in mutated_names:
                continue  # its value changes from call to call: nothing read from it is constant
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                values[node] = value
        elif node.op == "call_function" and _is_pure(node):
            inputs = list(walk_args((node.args, node.kwargs)))
            if all(i in values for i in inputs):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)

    folded = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if value.numel() > max_numel:
            continue
        if all(user in values and user.op != "output" for user in node.users):
            continue  # an inner node of a folded subgraph: its users fold too
        if any(not _is_pure(user) for user in node.users if user.op == "call_function"):
            continue  # an in-place op writes into it: a constant buffer would be mutated
        if not site(node):
            continue
        name = add_constant(gm, value.detach().clone().contiguous(), "_anefx_const")
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        folded += 1
    if folded:
        dce(gm.graph)
    return folded
