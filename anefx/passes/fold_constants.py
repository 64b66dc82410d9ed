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

import torch.fx

from anefx.analysis.legalize import fold_constants
from anefx.passes.base import Pass, PassContext, PassResult, finish


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
