"""``conv1d_bc1s`` — a 1-D convolution over (B, C, T) as a 2-D one over (B, C, 1, T).

``nn.Conv1d`` (Whisper's and wav2vec2's convolutional stems, Conformer's depthwise convolutions)
reads a channels-first (B, C, T) tensor. On the ANE the same tensor is (B, C, 1, T) — a free
``unsqueeze``, the time axis last and contiguous — and the convolution a ``conv2d`` whose kernel is
(1, K): the same weights viewed with a unit height (coremltools folds the view into the constant),
stride, padding and dilation on the width only. The output is (B, C_out, 1, T_out), which the layout
passes carry on to the (B, C, 1, S) layers that follow (Whisper: GELU, the second convolution,
GELU, then the transformer, with no transpose between them).

Original::

    %y = aten.conv1d(%x, %w, %b, [2], [1], [1], 1)       # x: (B, C, T), w: (O, C, 3)
Result::

    %x4 = aten.unsqueeze(%x, 2)                             # (B, C, 1, T)
    %w4 = aten.view(%w, [O, C, 1, 3])                       # a view of the weight: no copy
    %y4 = aten.conv2d(%x4, %w4, %b, [1, 2], [0, 1], [1, 1], 1)
    %y  = aten.squeeze.dim(%y4, 2)                          # (B, O, T_out)

Options: none. Convolutions with string padding (``"same"``) or a padding mode other than zeros
(which export spells as a separate ``pad``) are rewritten the same way; a rank-2 (unbatched)
input is left alone.
"""

from __future__ import annotations

import torch
import torch.fx

from anefx.ir.graph import call, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten

_CONV1D = {aten.conv1d.default, aten.conv1d.padding}


def _one(value, default: int) -> int | str:
    if value is None:
        return default
    if isinstance(value, str):
        return value
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class Conv1dBC1S(Pass):
    __doc__ = __doc__
    name = "conv1d_bc1s"
    runs_after = frozenset({"canonicalize", "fold_constants"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _CONV1D:
                continue
            args = dict(zip(["input", "weight", "bias", "stride", "padding", "dilation", "groups"], node.args))
            args.update(node.kwargs)
            x, w = args["input"], args["weight"]
            xs, ws = shape(x), shape(w)
            if xs is None or ws is None or len(xs) != 3 or len(ws) != 3 or not ctx.site(node):
                continue
            stride, dilation = _one(args.get("stride"), 1), _one(args.get("dilation"), 1)
            padding = _one(args.get("padding"), 0)
            groups = int(args.get("groups") or 1)
            with graph.inserting_before(node), provenance(node):
                x4 = call(graph, aten.unsqueeze.default, (x, 2))
                w4 = call(graph, aten.view.default, (w, [ws[0], ws[1], 1, ws[2]]))
                if isinstance(padding, str):
                    conv_args = (x4, w4, args.get("bias"), [1, stride], padding, [1, dilation], groups)
                    y4 = call(graph, aten.conv2d.padding, conv_args)
                else:
                    conv_args = (x4, w4, args.get("bias"), [1, stride], [0, padding], [1, dilation], groups)
                    y4 = call(graph, aten.conv2d.default, conv_args)
                y = call(graph, aten.squeeze.dim, (y4, 2))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            rewritten += 1
        return finish(gm, bool(rewritten), rewritten=rewritten)
