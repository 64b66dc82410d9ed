"""``fp16_mask_values`` — masks built from fp32 extremes get a large finite negative fp16 can hold.

Additive attention masks are often built from ``torch.finfo(torch.float32).min`` (or ``-1e9``). In
fp16 that is ``-inf``: a fully masked row then becomes NaN, and ``x + mask`` can overflow. A finite
negative beyond the fp16 range is raised to ``-mask_value`` where it is a *mask*: a fill value of a
``masked_fill`` whose result reaches a softmax, a scalar operand of an op that builds a mask (its
result reaches a softmax's input or an SDPA ``attn_mask``, and it is not computed from the
activations' products), or a constant buffer that reaches a softmax. The same values elsewhere
(``x * -1e6`` on activations, a ``clamp(min=-1e5)`` no softmax reads) are left alone, and nothing
changes when the target computes in fp32 (``PassContext.precision``). After a softmax the result
is the same (the masked weights are exactly 0 in fp32 either way); validation checks it.

Original::

    %m = aten.mul(aten.rsub(%keep, 1.0), -3.4028e+38)      # torch.finfo(torch.float32).min
    %s = aten.masked_fill(%scores, %pad, -3.4028e+38)
Result::

    %m = aten.mul(aten.rsub(%keep, 1.0), -10000.0)
    %s = aten.masked_fill(%scores, %pad, -10000.0)

Options:
  mask_value: the magnitude used instead (default 1e4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.masks import mask_values
from anefx.ir.graph import add_constant, get_attr_value
from anefx.passes.base import Pass, PassContext, PassResult, finish

FP16_MAX = 65504.0
_FILLS = {torch.ops.aten.masked_fill.Scalar, torch.ops.aten.where.ScalarOther, torch.ops.aten.where.ScalarSelf}


@dataclass(frozen=True)
class Fp16MaskValuesOptions:
    mask_value: float = 1e4


def _too_big(x) -> bool:
    """A finite negative beyond fp16's range: a stand-in for -inf (masks are negative fills)."""
    return isinstance(x, float) and math.isfinite(x) and x < -FP16_MAX


class Fp16MaskValues(Pass):
    __doc__ = __doc__
    name = "fp16_mask_values"
    runs_after = frozenset({"attention_bc1s"})
    Options = Fp16MaskValuesOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.precision != "float16":
            return finish(gm, False, scalars=0, constants=0)
        v = self.options.mask_value
        masks, masked = mask_values(gm.graph)
        scalars = constants = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.meta.get("val") is not None:
                val = node.meta["val"]
                if isinstance(val, torch.Tensor) and not val.is_floating_point():
                    continue
                fill = node.target in _FILLS and node in masked
                if not (fill or node in masks):
                    continue
                args = [-v if _too_big(a) else a for a in node.args]  # a fill's only scalar is its value
                kwargs = {k: (-v if _too_big(a) else a) for k, a in node.kwargs.items()}
                if (args != list(node.args) or kwargs != dict(node.kwargs)) and ctx.site(node):
                    node.args, node.kwargs = tuple(args), kwargs
                    scalars += 1
            elif node.op == "get_attr" and node in masked:
                value = get_attr_value(gm, node)
                if (
                    isinstance(value, torch.Tensor)
                    and not isinstance(value, torch.nn.Parameter)
                    and value.is_floating_point()
                    and value.numel()
                ):
                    finite = value[torch.isfinite(value)]
                    if finite.numel() and float(finite.min()) < -FP16_MAX and ctx.site(node):
                        clamped = torch.where(torch.isfinite(value), value.clamp_min(-v), value)
                        name = add_constant(gm, clamped, "_anefx_fp16_const")
                        node.target = name
                        constants += 1
        return finish(gm, bool(scalars or constants), scalars=scalars, constants=constants)
