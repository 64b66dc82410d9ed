"""Static rules that predict which Core ML (MIL) ops leave the Neural Engine, or are slow on it.

Apple does not document ANE placement. Each rule is therefore a *prediction* stated as data: what it
checks, its verdict, and the public source it rests on. Ops no rule knows are reported as
``unknown`` rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from anefx.analysis.layout import padded_bytes, padding_factor

SOURCES = {
    "apple_transformers": (
        "Apple Machine Learning Research, 'Deploying Transformers on the Apple Neural Engine' (2022), "
        "https://machinelearning.apple.com/research/neural-engine-transformers"
    ),
    "hollance_fp16": (
        "M. Hollemans, 'Is the ANE 16-bit?', hollance/neural-engine docs/16-bit.md "
        "(https://github.com/hollance/neural-engine)"
    ),
    "coremltools_typed": (
        "coremltools guide 'Typed Execution' (fp16 vs fp32 compute precision), "
        "https://apple.github.io/coremltools/docs-guides/source/typed-execution.html"
    ),
    "hollance_unsupported": (
        "M. Hollemans, 'Which Core ML layers are not supported by the ANE?', hollance/neural-engine "
        "docs/unsupported-layers.md: RNN layers, gather, dilated convolutions, custom layers"
    ),
    "coremltools_337": "apple/coremltools issue #337: LSTMs run on BNNS (CPU), not on the Neural Engine",
    "rfdetr_1495": (
        "roboflow/rf-detr pull request #1495: MLComputePlan on M3 Pro shows topk and the "
        "gather_along_axis/tile ops consuming its indices leave the ANE"
    ),
    "community_dims": (
        "community reports of ANE compilation failing on very large axes (e.g. apple/coremltools #2758); "
        "the 16384 threshold is not confirmed by Apple"
    ),
}


@dataclass(frozen=True)
class OpInfo:
    """What the rules see of one MIL op."""

    name: str
    op_type: str
    out_dtypes: tuple[str, ...]  # e.g. ("fp16",)
    out_shapes: tuple[tuple[int, ...] | None, ...]
    const_inputs: frozenset[str]  # names of inputs that are constants
    attrs: dict


@dataclass(frozen=True)
class Rule:
    id: str
    verdict: str  # "off_ane" | "slow" | "unknown"
    title: str
    source: str
    check: Callable[[OpInfo], str | None]  # returns the reason, or None when the rule does not apply


# ---- the checks --------------------------------------------------------------------------------
_NO_COMPUTE = {"const", "cast"}
GATHER = {"gather", "gather_nd", "gather_along_axis", "embedding"}
SCATTER_DYNAMIC = {
    "scatter",
    "scatter_nd",
    "scatter_along_axis",
    "topk",
    "argsort",
    "non_zero",
    "non_maximum_suppression",
    "dynamic_slice",
}
RECURRENT = {"lstm", "gru", "rnn"}
MAX_DIM = 16384


def _fp32(op: OpInfo) -> str | None:
    if op.op_type in _NO_COMPUTE:
        return None
    if "fp32" in op.out_dtypes:
        return "computes in fp32; the ANE computes in fp16, so Core ML runs this op elsewhere"
    return None


def _gather(op: OpInfo) -> str | None:
    if op.op_type in GATHER:
        return f"{op.op_type} (an embedding or index lookup) is a gather"
    return None


def _dynamic(op: OpInfo) -> str | None:
    if op.op_type in SCATTER_DYNAMIC:
        return f"{op.op_type} is data-dependent indexing"
    if op.op_type == "slice_by_index" and not {"begin", "end"} <= op.const_inputs:
        return "slice with bounds computed at run time"
    return None


def _recurrent(op: OpInfo) -> str | None:
    return f"{op.op_type} is a recurrent layer" if op.op_type in RECURRENT else None


def _int32(op: OpInfo) -> str | None:
    if op.op_type in _NO_COMPUTE:
        return None
    if any(d in ("int32", "int16", "int64") for d in op.out_dtypes):
        return "produces an integer tensor; the ANE computes in fp16"
    return None


def _rank(op: OpInfo) -> str | None:
    ranks = [len(s) for s in op.out_shapes if s is not None]
    if ranks and max(ranks) > 5:
        return f"rank-{max(ranks)} tensor; the ANE works on at most 5-D (natively 4-D) tensors"
    if ranks and max(ranks) == 5 and op.op_type not in _NO_COMPUTE:
        return "rank-5 tensor; the ANE's native layout is 4-D (B, C, H, W)"
    return None


def _dims(op: OpInfo) -> str | None:
    for s in op.out_shapes:
        if s and max(s) > MAX_DIM:
            return f"an axis of size {max(s)} > {MAX_DIM}"
    return None


PADDING_MIN_BYTES = 256 * 1024  # ignore small tensors: their padding does not matter


def _padding(op: OpInfo) -> str | None:
    if op.op_type in _NO_COMPUTE:
        return None
    for s in op.out_shapes:
        f = padding_factor(s)
        if f >= 2 and padded_bytes(s) >= PADDING_MIN_BYTES:
            return f"last axis of {s} is {s[-1]} wide: padded to 64 bytes it takes {f:.0f}x the memory"
    return None


def _dilated(op: OpInfo) -> str | None:
    if op.op_type == "conv" and any(d > 1 for d in op.attrs.get("dilations", ()) or ()):
        return "dilated convolution"
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        "fp32_compute", "off_ane", "fp32 compute", f"{SOURCES['hollance_fp16']}; {SOURCES['coremltools_typed']}", _fp32
    ),
    Rule(
        "gather",
        "off_ane",
        "gather / embedding lookup",
        f"{SOURCES['hollance_unsupported']}; {SOURCES['rfdetr_1495']}",
        _gather,
    ),
    Rule("dynamic_indexing", "off_ane", "dynamic slicing, scatter, top-k", SOURCES["rfdetr_1495"], _dynamic),
    Rule(
        "recurrent",
        "off_ane",
        "recurrent layer (LSTM/GRU/RNN)",
        f"{SOURCES['hollance_unsupported']}; {SOURCES['coremltools_337']}",
        _recurrent,
    ),
    Rule("int_tensor", "off_ane", "integer tensor", SOURCES["hollance_fp16"], _int32),
    Rule("rank", "slow", "tensor rank beyond 4-D", SOURCES["apple_transformers"], _rank),
    Rule("dimension_limit", "off_ane", "axis larger than 16384", SOURCES["community_dims"], _dims),
    Rule(
        "last_axis_padding", "slow", "last axis wastes the 64-byte alignment", SOURCES["apple_transformers"], _padding
    ),
    Rule("dilated_conv", "off_ane", "dilated convolution", SOURCES["hollance_unsupported"], _dilated),
)

#: MIL ops with no rule against them that are known to run on the ANE in fp16 (Apple's reference
#: transformers and vision models use them); anything else is reported as "unknown".
KNOWN_ANE_OPS = {
    "conv", "conv_transpose", "add", "sub", "mul", "real_div", "maximum", "minimum", "pow",
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "elu", "softplus", "clip",
    "softmax", "layer_norm", "instance_norm", "batch_norm", "l2_norm",
    "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "rsqrt", "sqrt", "exp", "log", "abs",
    "inverse", "square", "erf", "einsum", "matmul", "linear", "concat", "split", "slice_by_index",
    "slice_by_size", "squeeze", "expand_dims", "reshape", "transpose", "avg_pool", "max_pool",
    "upsample_nearest_neighbor", "upsample_bilinear", "pad", "select", "logical_and", "logical_or",
    "logical_not", "equal", "not_equal", "less", "less_equal", "greater", "greater_equal", "tile",
    "fill", "scaled_dot_product_attention",
    # Core ML states (iOS 18): a KV cache read, written back, and its new column written in place by a
    # run-time-indexed slice_update, as Anemll (Anemll/Anemll llama_model.py) and CoreML-LLM
    # (docs/MLSTATE_PATTERN.md: on iPhone 17 Pro's ANE) run them; under Core AI the same write crashes
    # the ANE compiler (apple/coreai-torch#6), which anefx's LM front end does not target
    "read_state", "coreml_update_state", "slice_update",
}  # fmt: skip
UNKNOWN_SOURCE = "no published evidence either way: anefx does not guess"
