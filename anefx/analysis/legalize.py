"""What legalization needs to know about a graph: which values are written in place.

The legalization rewrites themselves (``canonicalize``, ``fold_constants``) are passes
(:mod:`anefx.passes.canonicalize`, :mod:`anefx.passes.fold_constants`) that the targets run too;
what they share with the targets (and the LM front end) is here.
"""

from __future__ import annotations

import torch
import torch.fx

from anefx.compat.torch import is_op_overload, op_schema


def aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s result may share memory with one of its inputs (a view, ``getitem``…)."""
    t = node.target
    if not is_op_overload(t):
        return node.op == "call_function"  # getitem of a multi-output op and the like: assume so
    return any(r.alias_info is not None for r in op_schema(t).returns)


def is_pure(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a value from its inputs alone: an ATen op, not random, writing nothing."""
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
        if n.op == "call_function" and aliases(n) and n.args and isinstance(n.args[0], torch.fx.Node):
            stack.append(n.args[0])  # the base it views
        stack.extend(u for u in n.users if u.op == "call_function" and (aliases(u) or _writes(u)))
    return seen


def mutated_buffers(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the buffers the graph writes into (a KV cache updated in place, a step counter …)."""
    return {n.target for n in mutated_nodes(gm.graph) if n.op == "get_attr"}
