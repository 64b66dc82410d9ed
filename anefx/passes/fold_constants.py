"""``fold_constants`` — evaluate the parts of the graph that do not depend on the inputs.

Static shapes make much of a model's bookkeeping constant: position ids sliced from a buffer,
``arange``/``unsqueeze`` index grids, causal masks, ``new_ones`` of a fixed size. This pass computes
those subgraphs once and replaces each one's frontier by a constant buffer (a ``get_attr``).

Original::

    %arange = aten.arange(128)
    %causal = aten.le(%arange_a, %arange_b)          # depends on nothing but constants
    %mask   = aten.logical_and(%causal, %padding)    # %padding comes from an input
Result::

    %_anefx_const0 = get_attr[_anefx_const0]         # the (128, 128) causal tensor
    %mask = aten.logical_and(%_anefx_const0, %padding)

Weights are never folded (no second copy of a parameter is made): a subgraph that reads an
``nn.Parameter`` is left alone, and so is any result larger than ``max_numel`` elements. Neither is
a subgraph that reads a buffer the model mutates (an in-place KV cache update, a step counter): its
value changes from call to call.

Options:
  max_numel: largest folded constant, in elements (default 1,048,576)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.legalize import is_pure, mutated_nodes
from anefx.ir.graph import add_constant, dce, get_attr_value, walk_args
from anefx.ir.sites import SiteFilter, every_site
from anefx.passes.base import Pass, PassContext, PassResult, finish


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
        elif node.op == "call_function" and is_pure(node):
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
        if any(not is_pure(user) for user in node.users if user.op == "call_function"):
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


@dataclass(frozen=True)
class FoldConstantsOptions:
    max_numel: int = 1 << 20


class FoldConstants(Pass):
    __doc__ = __doc__
    name = "fold_constants"
    Options = FoldConstantsOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = fold_constants(gm, self.options.max_numel, ctx.site)
        return finish(gm, bool(folded), folded=folded)
