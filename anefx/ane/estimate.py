"""A roofline estimate of ANE memory and latency, per chip. An *estimate*, not a measurement.

For each MIL op: FLOPs (multiply-adds x 2 for conv/matmul/einsum, one per output element otherwise)
and the bytes it moves, from the traffic estimate (:mod:`anefx.ane.traffic`: activations padded on
the last axis to 64 bytes, each weight read once, states updated in place).
Time = max(FLOPs / peak, bytes / bandwidth), summed over ops. Transposes and reshapes are counted, and
so are those of them that copy memory in that padded layout (:func:`anefx.analysis.layout.moves_data`;
a reshape that keeps the last axis, GroupNorm's, does not). Peak figures are Apple's published
"trillion operations per second"; Apple does not say at which precision, so fp16 throughput may be
lower. Each figure carries its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from anefx.analysis.layout import moves_data
from anefx.ane.rules import OpInfo
from anefx.ane.traffic import OpTraffic


@dataclass(frozen=True)
class Chip:
    name: str
    tops: float
    bandwidth_gbs: float
    source: str


CHIPS: dict[str, Chip] = {
    "M1": Chip("M1", 11.0, 68.25, "Apple newsroom, 'Apple unleashes M1' (2020-11-10): 16-core Neural Engine, 11 TOPS; "
               "68.25 GB/s from the LPDDR4X-4266 128-bit interface (Apple M1 product pages)"),
    "M2": Chip("M2", 15.8, 100.0, "Apple newsroom, 'Apple unveils M2' (2022-06-06): 15.8 TOPS, 100 GB/s"),
    "M4": Chip("M4", 38.0, 120.0, "Apple newsroom, 'Apple introduces M4 chip' (2024-05-07): 38 TOPS, 120 GB/s"),
}  # fmt: skip

LAYOUT_OPS = {"transpose", "reshape"}


@dataclass
class OpCost:
    name: str
    op_type: str
    flops: float
    bytes: int  #: read + written + the weights this op reads first
    weights: int = 0
    #: a transpose or reshape that copies memory (:func:`anefx.analysis.layout.moves_data`)
    moves: bool = False


@dataclass
class Estimate:
    ops: list[OpCost] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def activation_bytes(self) -> int:
        return sum(o.bytes - o.weights for o in self.ops)

    @property
    def weight_bytes(self) -> int:
        return sum(o.weights for o in self.ops)

    @property
    def layout_ops(self) -> int:
        return sum(1 for o in self.ops if o.op_type in LAYOUT_OPS)

    @property
    def layout_bytes(self) -> int:
        return sum(o.bytes for o in self.ops if o.op_type in LAYOUT_OPS)

    @property
    def moving_layout_ops(self) -> int:
        return sum(1 for o in self.ops if o.op_type in LAYOUT_OPS and o.moves)

    def seconds(self, chip: Chip) -> float:
        peak, bw = chip.tops * 1e12, chip.bandwidth_gbs * 1e9
        return sum(max(o.flops / peak, o.bytes / bw) for o in self.ops)

    def to_dict(self) -> dict:
        return {
            "label": "ESTIMATE (roofline from published peak figures, not a measurement)",
            "gflops": round(self.flops / 1e9, 3),
            "padded_activation_mib": round(self.activation_bytes / 2**20, 3),
            "weight_mib": round(self.weight_bytes / 2**20, 3),
            "layout_change_ops": self.layout_ops,
            "layout_change_ops_moving_data": self.moving_layout_ops,
            "layout_change_mib": round(self.layout_bytes / 2**20, 3),
            "ms_per_chip": {c.name: round(self.seconds(c) * 1e3, 3) for c in CHIPS.values()},
            "chip_sources": {c.name: c.source for c in CHIPS.values()},
        }


def op_cost(
    op: OpInfo, in_shapes: list[tuple[int, ...] | None], weight_shapes: list[tuple[int, ...]], traffic: OpTraffic
) -> OpCost:
    out = op.out_shapes[0] if op.out_shapes else None
    out_n = math.prod(out) if out else 0
    flops = float(out_n)
    if op.op_type == "conv" and weight_shapes:
        w = weight_shapes[0]
        flops = 2.0 * out_n * math.prod(w[1:])  # each output: in/groups * kh * kw multiply-adds
    elif op.op_type == "einsum" and op.attrs.get("equation") and len(in_shapes) == 2 and all(in_shapes):
        flops = 2.0 * out_n * _contracted(op.attrs["equation"], in_shapes)
    elif op.op_type in ("matmul", "linear") and in_shapes and in_shapes[0] and out:
        flops = 2.0 * out_n * in_shapes[0][-1]
    moves = False
    if op.op_type in LAYOUT_OPS and in_shapes and in_shapes[0] is not None and out is not None:
        moves = moves_data(in_shapes[0], out, list(op.attrs["perm"]) if "perm" in op.attrs else None)
    return OpCost(op.name, op.op_type, flops, traffic.total, traffic.weights, moves)


def _contracted(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Product of the sizes of the letters an einsum sums over."""
    lhs, out = equation.replace(" ", "").split("->")
    sizes: dict[str, int] = {}
    for letters, shape in zip(lhs.split(","), shapes):
        sizes.update(zip(letters, shape))
    return math.prod(n for letter, n in sizes.items() if letter not in out) or 1
