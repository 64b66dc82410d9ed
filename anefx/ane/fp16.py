"""fp16 range check: run the rewritten graph in fp32 and flag values fp16 cannot hold.

Every floating tensor's absolute maximum is recorded (``torch.fx.Interpreter``). A tensor is flagged
when it would overflow fp16 (finite values beyond 65504, including the ``x * x`` inside a LayerNorm
whose input strays beyond ±256) or when it holds the fp32 extremes used to build attention masks
(``torch.finfo(torch.float32).min``), which become ``-inf`` in fp16 and turn fully masked rows into
NaN. Masks have a safe rewrite — the ``fp16_mask_values`` pass — and the finding says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from anefx.analysis.heads import MOVEMENT
from anefx.analysis.ranges import FP16_MAX, value_ranges
from anefx.ir.graph import describe, source_location

HUGE = 1e38  # at or beyond this, fp32 values are stand-ins for infinity


@dataclass
class RangeFinding:
    node: str
    op: str
    absmax: float
    problem: str
    fix: str | None
    location: str | None


def check_fp16_range(gm: torch.fx.GraphModule, flat_inputs: Sequence) -> list[RangeFinding]:
    absmax = value_ranges(gm, [flat_inputs])
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
                    None,
                    source_location(node),
                )
            )
    return findings
