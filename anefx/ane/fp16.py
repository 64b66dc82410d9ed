"""fp16 range check: run the rewritten graph in fp32 and flag values fp16 cannot hold, with what to try.

Every floating tensor's largest finite magnitude is recorded (:func:`anefx.analysis.ranges.value_ranges`,
on the example inputs or on the validation's input sets). A finding names the node, its source line,
the problem and what to try:

* a value that holds the fp32 extremes used to build attention masks
  (``torch.finfo(torch.float32).min``): ``-inf`` in fp16, NaN for a fully masked row. The
  ``fp16_mask_values`` pass replaces them;
* a value beyond 65,504: a residual stream (``fp16_residual_scale`` carries it scaled when only
  norms read it), or any other value (computed in fp32 for its region: anefx's fp16 fallback does
  it when the executed program fails; or the weights that produce it scaled down);
* the input of a norm beyond ±256, whose squares overflow inside the norm (``fp16_norm_scale``
  pre-scales it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.heads import MOVEMENT
from anefx.analysis.norms import norm_op
from anefx.analysis.ranges import FP16_MAX, value_ranges
from anefx.ir.graph import describe, source_location

aten = torch.ops.aten
HUGE = 1e38  # at or beyond this, fp32 values are stand-ins for infinity


@dataclass
class RangeFinding:
    node: str
    op: str
    absmax: float
    problem: str
    fix: str | None
    location: str | None


#: |x| beyond which a norm's squares overflow fp16 (256² > 65,504).
NORM_INPUT_MAX = 256.0
_STREAM_FIX = (
    "if only norms read this stream, the fp16_residual_scale pass carries it scaled (default pipeline); "
    "otherwise compute this region in fp32, or scale down the weights that write into it"
)
_OTHER_FIX = (
    "compute this region in fp32 (the compile's fp16 fallback does when the executed program fails), "
    "or scale down the weights that produce it"
)


def check_fp16_range(gm: torch.fx.GraphModule, flat_inputs: Sequence, input_sets=None) -> list[RangeFinding]:
    """Findings for ``gm`` run on ``flat_inputs`` (or on every set of ``input_sets``)."""
    absmax = value_ranges(gm, input_sets if input_sets is not None else [flat_inputs])
    findings = []
    for node in gm.graph.nodes:
        if node.name not in absmax:
            continue
        value = absmax[node.name]
        if node.op not in ("call_function", "get_attr") or node.target in MOVEMENT:
            continue  # data movement repeats its input's values: report where they are made
        if value >= HUGE:
            findings.append(
                RangeFinding(
                    node.name,
                    describe(node),
                    value,
                    "holds the fp32 extreme used for masks: -inf in fp16, NaN for a fully masked row",
                    "the fp16_mask_values pass replaces it with -1e4 (in the default pipeline)",
                    source_location(node),
                )
            )
        elif value > FP16_MAX:
            findings.append(
                RangeFinding(
                    node.name,
                    describe(node),
                    value,
                    f"overflows fp16 (|x| up to {value:.3g} > {FP16_MAX:g})",
                    _STREAM_FIX if node.target in (aten.add.Tensor, aten.sub.Tensor) else _OTHER_FIX,
                    source_location(node),
                )
            )
        norm = norm_op(node)
        if norm is not None and absmax.get(norm.x.name, 0.0) > NORM_INPUT_MAX:
            findings.append(
                RangeFinding(
                    node.name,
                    describe(node),
                    absmax[norm.x.name],
                    f"its input reaches {absmax[norm.x.name]:.3g}: squares beyond 65,504 inside the norm in fp16",
                    "the fp16_norm_scale pass pre-scales the input by a power of two (default pipeline)",
                    source_location(node),
                )
            )
    return findings
