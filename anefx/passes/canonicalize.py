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
    %p = aten.einsum("nhwpqc->nchpwq", [%r])              # one operand, only permuted (DiT's unpatchify)
    %n = aten.rms_norm(%h, [C], %g, None)                 # eps None: coremltools needs a number
Result::

    %o = aten.ones([1, 128], dtype=bool)
    %a = aten.logical_and(%o, %b)                         # uses %x where %c was used
    %w = aten.masked_fill(%x, aten.logical_not(%c), -inf)
    %i = aten.add(%tmp, %j)
    %p = aten.permute(%r, [0, 5, 1, 3, 2, 4])             # one MIL transpose, as coremltools makes it
    %n = aten.rms_norm(%h, [C], %g, 1.1920928955078125e-07)  # torch.finfo(dtype).eps, what None means

Options: none.
"""

from __future__ import annotations

import torch.fx

from anefx.analysis.legalize import canonicalize
from anefx.passes.base import Pass, PassContext, PassResult, finish


class Canonicalize(Pass):
    __doc__ = __doc__
    name = "canonicalize"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = canonicalize(gm, ctx.site)
        return finish(gm, any(stats.values()), **stats)
