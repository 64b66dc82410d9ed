"""``fp16_residual_scale`` — a residual stream beyond fp16's range is carried scaled by a power of two.

A transformer's residual stream (``h = h + block(norm(h))``) can outgrow fp16's 65,504 while every
value computed from it stays small: the blocks read it only through norms, which are
scale-invariant. Gemma 3 is the known case; Anemll ships it with the weights that write into the
stream scaled by 0.1875. The pass does the same from the model's own values: where an ``add``
of the stream exceeds ``max_abs`` on the validation inputs (``PassContext.ranges``, fp16 targets
only), the stream from there on holds ``h · s`` (``s = 2⁻ᵏ``, exact in fp16):

* the stream: every value computed from those adds by ops that commute with a scale (``add`` /
  ``sub`` of two stream values, ``mul`` / ``div`` by a value outside the stream, ``neg``, ``cat``,
  views and transposes);
* what enters it is multiplied by ``s``: a projection (``linear`` / ``convolution`` with constant
  weights) that writes only into the stream gets its weight and bias scaled (folded into
  constants before conversion, so the projection's own output fits fp16 too), anything else a
  ``mul`` by ``s``;
* norms that read it get ``ε · s²`` (the same norm: ``scale_norm_input``), any other reader the
  value times ``1/s``.

A value that exceeds fp16 even after the norm-only readers are accounted for (the stream
returned as an output, read by a non-linear op) still overflows: the fp16 check of the compile
names it (``RangeFinding``).

Original::

    %h1 = aten.add(%h0, aten.convolution(%g, %w_down, %b_down, …))   # |h1| up to 150,000
    %n1 = anefx.channel_layer_norm(%h1, %gamma, %beta, 1e-05)
Result::

    %h1 = aten.add(aten.mul(%h0, 0.125), aten.convolution(%g, aten.mul(%w_down, 0.125), aten.mul(%b_down, 0.125), …))
    %n1 = anefx.channel_layer_norm(%h1, %gamma, %beta, 1.5625e-07)    # ε · 2⁻⁶

Options:
  max_abs: stream values larger than this on the validation inputs are scaled to at most it (a
    quarter of fp16's range by default, for inputs beyond the validation's)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.heads import MOVEMENT
from anefx.analysis.norms import norm_op, scale_norm_input
from anefx.ir.graph import call, is_constant, provenance, shape
from anefx.passes.base import Pass, PassContext, PassResult, finish

aten = torch.ops.aten

_SUMS = {aten.add.Tensor, aten.sub.Tensor}
_BY_OTHER = {aten.mul.Tensor, aten.div.Tensor}  # scale-commuting when only the first operand is in the stream
_PROJECTIONS = {aten.linear.default, aten.convolution.default, aten.conv2d.default, aten.conv1d.default}


@dataclass(frozen=True)
class Fp16ResidualScaleOptions:
    max_abs: float = 16384.0


def _commutes(user: torch.fx.Node, value: torch.fx.Node, stream: set) -> bool:
    """Whether ``user`` computes ``s · f(...)`` when its input ``value`` is scaled by ``s`` (and its
    other stream inputs too)."""
    t = user.target
    if t in _SUMS or t == aten.neg.default or t in MOVEMENT:
        return t in _SUMS or user.args[0] is value
    if t == aten.cat.default:
        return True
    if t in _BY_OTHER:
        other = user.args[1] if user.args[0] is value else user.args[0]
        return (user.args[0] is value or t == aten.mul.Tensor) and other is not value and other not in stream
    return False


def _residual_sum(node: torch.fx.Node) -> bool:
    """A sum of two computed tensors of the result's shape (``h + block(h)``), not ``x + ε``."""
    if node.op != "call_function" or node.target not in _SUMS:
        return False
    a, b = node.args[:2]
    return all(isinstance(v, torch.fx.Node) and not is_constant(v) and shape(v) == shape(node) for v in (a, b))


class Fp16ResidualScale(Pass):
    __doc__ = __doc__
    name = "fp16_residual_scale"
    runs_after = frozenset({"linear_to_conv", "layer_norm_bc1s", "rms_norm_bc1s", "to_bc1s", "fold_transposes"})
    needs_ranges = True
    Options = Fp16ResidualScaleOptions

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        ranges = ctx.ranges
        if ctx.precision != "float16" or not ranges:
            return finish(gm, False, streams=0)
        limit = self.options.max_abs
        seeds = [n for n in gm.graph.nodes if _residual_sum(n) and ranges.get(n.name, 0.0) > limit and ctx.site(n)]
        if not seeds:
            return finish(gm, False, streams=0)
        stream = self._stream(seeds)
        largest = max(ranges.get(n.name, 0.0) for n in stream)
        s = 2.0 ** -max(1, math.ceil(math.log2(largest / limit)))
        entries, exits, norms = self._rewrite(gm.graph, stream, s)
        return finish(
            gm, True, streams=1, scale=s, largest=round(largest, 1), entries=entries, norms=norms, exits=exits
        )

    @staticmethod
    def _stream(seeds: list[torch.fx.Node]) -> set[torch.fx.Node]:
        """The values computed from ``seeds`` by scale-commuting ops."""
        stream: set[torch.fx.Node] = set(seeds)
        frontier = list(seeds)
        while frontier:
            value = frontier.pop()
            for user in value.users:
                if user.op == "call_function" and user not in stream and _commutes(user, value, stream):
                    stream.add(user)
                    frontier.append(user)
        return stream

    def _rewrite(self, graph: torch.fx.Graph, stream: set[torch.fx.Node], s: float) -> tuple[int, int, int]:
        entries = exits = norms = 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(stream, key=order.__getitem__):
            # what enters: the inputs of a sum or a cat that are not in the stream
            if node.target in _SUMS or node.target == aten.cat.default:
                args = list(node.args)
                for i in (0, 1) if node.target in _SUMS else (0,):
                    args[i], n = self._enter(graph, node, args[i], stream, s)
                    entries += n
                node.args = tuple(args)
            # what reads it from outside: norms with ε scaled, anything else the value times 1/s
            for user in list(node.users):
                if user in stream:
                    continue
                norm = norm_op(user)
                if norm is not None and norm.x is node:
                    scale_norm_input(norm, node, s)
                    norms += 1
                    continue
                with graph.inserting_after(node), provenance(node):
                    back = call(graph, aten.mul.Tensor, (node, 1.0 / s))
                user.replace_input_with(node, back)
                exits += 1
        return entries, exits, norms

    @staticmethod
    def _enter(graph, node, arg, stream, s: float):
        """``arg`` (an input of stream node ``node``) scaled by ``s``, and 1 if it was scaled."""
        if isinstance(arg, (list, tuple)):
            pairs = [Fp16ResidualScale._enter(graph, node, a, stream, s) for a in arg]
            return type(arg)(a for a, _ in pairs), sum(n for _, n in pairs)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return arg * s, 1
        if not isinstance(arg, torch.fx.Node) or arg in stream:
            return arg, 0
        projection = arg.op == "call_function" and arg.target in _PROJECTIONS and len(arg.users) == 1
        if projection and all(is_constant(a) for a in arg.args[1:3] if a is not None):
            args = list(arg.args)
            with graph.inserting_before(arg), provenance(arg):
                for i in (1, 2):  # weight, bias
                    if i < len(args) and args[i] is not None:
                        args[i] = call(graph, aten.mul.Tensor, (args[i], s))
            arg.args = tuple(args)
            return arg, 1
        with graph.inserting_before(node), provenance(node):
            return call(graph, aten.mul.Tensor, (arg, s)), 1
