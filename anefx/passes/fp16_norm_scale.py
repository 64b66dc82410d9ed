"""``fp16_norm_scale`` — a norm whose input squares overflow fp16 gets its input pre-scaled by a power of two.

LayerNorm and RMSNorm square their input: in fp16 (largest value 65,504) an input beyond ±256
overflows, the mean square becomes ``inf`` and the output 0 or NaN. Both norms are
scale-invariant: ``norm(x · s)`` with ``ε · s²`` is ``norm(x)``, exactly. The pass multiplies the
input of each norm whose values exceed ``max_abs`` by the power of two ``s = 2⁻ᵏ`` that brings them
under it (a power of two scales fp16 values exactly) and scales ``ε`` by ``s²``. So that ``ε`` does
not flush to zero in fp16 (a row of zeros would then give 0/0), it is kept at least fp16's smallest
positive number, 2⁻²⁴. That floor matters only when ``ε · s²`` is below it (``ε = 1e-5`` with
``s < 2⁻⁶``: inputs beyond ~8,000): the norm then computes with ``ε = 2⁻²⁴ / s²`` in the input's
units, which moves a row whose mean square is ``m`` by about ``2⁻²⁴ / (2 s² m)`` relative.

Which norms: the values come from the graph's value ranges on the validation's input sets (the
example, random and stress sets; ``PassContext.ranges``), so the pass acts only for an fp16 target
and only where this model's values do overflow. Matched: ``aten.layer_norm``, ``aten.rms_norm``,
``anefx::channel_layer_norm`` (the (B, C, 1, S) LayerNorm, and RMSNorm as a LayerNorm of
``[x, -x]``), and RMSNorm spelled out (``x * rsqrt(mean(x²) + ε)``).

Original::

    %n = aten.layer_norm(%x, [64], %w, %b, 1e-05)    # |x| up to 300: x² reaches 90,000
Result::

    %xs = aten.mul(%x, 0.25)                          # |x · 2⁻²| ≤ 75: x² ≤ 5,625
    %n = aten.layer_norm(%xs, [64], %w, %b, 6.25e-07) # ε · 2⁻⁴

Options:
  max_abs: norm inputs larger than this on the validation inputs are scaled to at most it (squares
    then stay under max_abs², a quarter of fp16's range by default)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.norms import match_rms_norm, norm_op, scale_norm_input, scaled_eps
from anefx.ir.graph import call, provenance
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten


@dataclass(frozen=True)
class Fp16NormScaleOptions:
    max_abs: float = 128.0


def scale_for(absmax: float, max_abs: float) -> float:
    """The power of two ``2⁻ᵏ`` (k ≥ 1) that brings ``absmax`` to at most ``max_abs``."""
    return 2.0 ** -max(1, math.ceil(math.log2(absmax / max_abs)))


class Fp16NormScale(Pass):
    __doc__ = __doc__
    name = "fp16_norm_scale"
    runs_after = frozenset({"layer_norm_bc1s", "rms_norm_bc1s", "attention_bc1s"})
    needs_ranges = True
    Options = Fp16NormScaleOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        ranges = ctx.ranges
        if ctx.precision != "float16" or not ranges:
            return finish(gm, False, norms=0)
        limit = self.options.max_abs
        scaled, largest = 0, 0.0
        graph = gm.graph
        for node in list(graph.nodes):
            norm = norm_op(node)
            spelled = match_rms_norm(node, (2, 3, 4)) if norm is None and node.target == aten.mean.dim else None
            x = norm.x if norm is not None else spelled.x if spelled is not None else None
            if x is None:
                continue
            absmax = ranges.get(x.name, 0.0)
            if absmax <= limit or not ctx.site(node):
                continue
            s = scale_for(absmax, limit)
            if spelled is not None:
                self._scale_spelled_rms(graph, node, spelled.x, s)
            else:
                with graph.inserting_before(node), provenance(node):
                    xs = call(graph, aten.mul.Tensor, (x, s))
                scale_norm_input(norm, xs, s)
            scaled += 1
            largest = max(largest, absmax)
        return finish(gm, bool(scaled), norms=scaled, largest_input=round(largest, 1))

    @staticmethod
    def _scale_spelled_rms(graph: torch.fx.Graph, mean: torch.fx.Node, x: torch.fx.Node, s: float) -> None:
        """``x * rsqrt(mean(x²) + ε)`` → the same with ``x · s`` and ``ε · s²``."""
        square = mean.args[0]
        add = next(iter(mean.users))
        h = next(iter(next(iter(add.users)).users))  # x * rsqrt(…)
        with graph.inserting_before(square), provenance(mean):
            xs = call(graph, aten.mul.Tensor, (x, s))
        square.args = tuple(xs if a is x else a for a in square.args)
        h.args = tuple(xs if a is x else a for a in h.args)
        add.args = (add.args[0], scaled_eps(float(add.args[1]), s), *add.args[2:])
