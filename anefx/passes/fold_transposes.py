"""``fold_transposes`` — cancel, merge and sink permutes and reshapes, to a fixed point.

Each transpose or reshape is a memory copy on the ANE. Rewrite rules (one line each):

* ``transpose(x, a, b)``                   → ``permute(x, p)``             (one spelling)
* ``permute(permute(x, p), q)``            → ``permute(x, p∘q)``           (merge chains)
* ``permute(x, identity)``                 → ``x``
* ``unary(permute(x, p))``                 → ``permute(unary(x), p)``      (sink through activations)
* ``unary(squeeze(x, d))``                  → ``squeeze(unary(x), d)``      (likewise)
* ``binop(permute(a, p), permute(b, p))``  → ``permute(binop(a, b), p)``   (sink through elementwise)
* ``reshape(permute(x, p))``, the reshape only splitting axes, when the permute then merges with
  one below or the reshape with one above  → ``permute(reshape(x), p')``  (DiT's unpatchify)
* shape-only chain (view/reshape/squeeze/unsqueeze/flatten) whose result has the shape of its
  start                                     → the start
* two or more shape-only ops in a row, one a reshape → one ``reshape``
* a chain of permutes and shape-only ops that keeps every element in its place (checked by
  replaying it on ``arange``, :func:`anefx.analysis.heads.simulate`)
                                            → one ``reshape`` of its start (or the start),
  except when its last op swaps the last two axes (one of them a unit axis) for matrix products
  only and the ops before it keep the last axis, while the one reshape would change it
  (:func:`anefx.analysis.layout.moves_data`): the swap is the products' ``transpose_x``/``_y``
  and the view is free, the reshape a copy of a padded column (a decode step's query
  ``(1, H·D, 1, 1)`` → ``(1, H, D, 1)`` read as ``q^T @ K``)

* ``binop(permute(a, p), c)``, c constant   → ``permute(binop(a, c'), p)`` with c' = c permuted by
  p's inverse (a constant: coremltools folds it)

Sinking only happens when the permute has a single user, so no permute of an activation is ever
duplicated: the number of permutes on activations never grows.

Original::

    %a = aten.permute(%x, [0, 2, 1])
    %b = aten.relu(%a)
    %c = aten.transpose(%b, 1, 2)
    %d = aten.unsqueeze(aten.squeeze(%y, 2), 2)
Result::

    %b = aten.relu(%x)             # the two transposes cancelled around relu
    %d = %y                        # squeeze/unsqueeze cancelled

Options:
  max_iterations: bound on fixed-point rounds (default 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from anefx.analysis.transposes import fold_transposes
from anefx.passes.base import Pass, PassContext, PassResult, finish


@dataclass(frozen=True)
class FoldTransposesOptions:
    max_iterations: int = 32


class FoldTransposes(Pass):
    __doc__ = __doc__
    name = "fold_transposes"
    runs_after = frozenset({"to_bc1s"})
    Options = FoldTransposesOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = fold_transposes(gm, self.options.max_iterations)
        return finish(gm, any(stats.values()), **stats)
