"""Value ranges: the largest magnitude each value of a graph takes on given inputs.

fp16 holds magnitudes up to 65,504. Whether a model's values fit is a fact of its values, not of
its shapes: :func:`value_ranges` runs the graph in its own precision (fp32) on input sets (the
validation's example, random and stress sets) and records, per node, the largest finite magnitude
of its value over all of them. The fp16-safety passes read it (``PassContext.ranges``, filled by
the pipeline for passes that declare ``needs_ranges``); the ANE report's fp16 check reads it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx

#: fp16's largest finite value.
FP16_MAX = 65504.0


def finite_absmax(t: torch.Tensor) -> float:
    """The largest finite magnitude of ``t`` (0.0 for an empty or a non-floating tensor, or one
    with no finite element): infinities and NaN count as 0, without a copy of the finite elements."""
    if not t.is_floating_point() or not t.numel():
        return 0.0
    return float(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).abs().max())


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, absmax: dict[str, float]):
        super().__init__(gm)
        self.absmax = absmax

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            value = finite_absmax(out)
            self.absmax[n.name] = max(self.absmax.get(n.name, 0.0), value)
        return out


def value_ranges(gm: torch.fx.GraphModule, input_sets: Iterable[Sequence]) -> dict[str, float]:
    """Node name → the largest finite ``|value|`` of the node's floating-point value over the flat
    input sets (placeholder order). Nodes without a floating value are not listed."""
    absmax: dict[str, float] = {}
    with torch.no_grad():
        for inputs in input_sets:
            _Recorder(gm, absmax).run(*inputs)
    return absmax
