"""Weight compression of a converted Core ML program, in the forms the Neural Engine runs.

:func:`compress_function` palettizes (``lut4``/``lut6``/``lut8``: k-means look-up tables, one per
group of output channels) or linearly quantizes (``int8``: one scale per output channel) the
weights of one converted function with ``coremltools.optimize.coreml``; anefx runs no k-means of
its own. :meth:`anefx.targets.artifact.Artifact.compressed` does it for every function of every
package of an artifact, whichever front end made it, and gathers the results into one
:class:`Compression`. Which weights are compressed, and how, is decided per weight before
coremltools runs:

* a weight is compressed only when anefx can name its counterpart in the re-exported torch graph
  (MIL const ``view_8_to_fp16`` ↔ FX node ``view_8`` ↔ parameter ``model.layers.0.q_proj.weight``)
  and the values agree: that is what lets :mod:`anefx.targets.quality` measure the shipped weights
  in PyTorch. Weights without a counterpart stay fp16, with the reason in the plan.
* ``keep_fp16`` patterns, ``keep_embeddings``, ``keep_lm_head``, ``keep_first_layers``,
  ``keep_last_layers`` and ``per_layer`` (pattern → scheme, first match wins) choose per weight.

Refused up front (before capture or conversion starts), with what to use instead:

* per-block integer quantization (``int4``, ``int8`` with ``block_size``): reported to give wrong
  output on the Neural Engine (cosine 0.367 against 0.999 on the GPU for the same 8-bit per-block
  asset; apple/coreai-models#279) — use a grouped-channel LUT (``lut4``/``lut6``/``lut8``);
* grouped-channel LUTs before iOS18/macOS15 (``constexpr_lut_to_dense`` gained per-group tables in
  iOS18) — raise ``minimum_deployment_target`` or use ``granularity="per_tensor"``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from anefx.compat.coremltools import kmeans_lut_and_indices, operations, quiet_coremltools
from anefx.driver.events import Events, events_of
from anefx.ir.errors import AnefxError
from anefx.ir.graph import layer_of
from anefx.targets.base import ConvertedFunction
from anefx.targets.quality import CompressionQuality, LMQuality, WeightSwap

if TYPE_CHECKING:
    from coremltools.models import MLModel

#: The schemes anefx ships: name → (coremltools compressor, bits).
SCHEMES: dict[str, tuple[str, int]] = {
    "lut4": ("palettize", 4),
    "lut6": ("palettize", 6),
    "lut8": ("palettize", 8),
    "int8": ("linear", 8),
}
#: Names users try that the Neural Engine cannot run correctly, with the reason and the alternative.
REFUSED: dict[str, str] = {
    "int4": (
        "4-bit integer quantization exists in coremltools only per block (constexpr_blockwise_shift_scale with "
        "a block size), and per-block integer weights are reported to give wrong output on the Neural Engine "
        "(apple/coreai-models#279: cosine 0.367 on the ANE vs 0.999 on the GPU); use 'lut4' (a 4-bit "
        "grouped-channel look-up table), which the ANE runs"
    ),
    "int4_block": "per-block integer quantization is refused (see 'int4'); use 'lut4'",
    "int8_block": "per-block integer quantization is refused (see 'int4'); use 'int8' (per channel) or 'lut8'",
}
_FP16 = "fp16"
#: Deployment targets that have grouped-channel LUTs (``constexpr_lut_to_dense`` iOS18 opset).
_IOS18_PLUS = re.compile(r"^(iOS(1[89]|[2-9]\d)|macOS(1[5-9]|[2-9]\d)|watchOS(1[1-9]|[2-9]\d)|tvOS(1[89]|[2-9]\d))$")


@dataclass(frozen=True)
class CompressionOptions:
    """How weights are compressed (``anefx.compile(..., compression=CompressionOptions(...))``).

    scheme: ``lut4`` | ``lut6`` | ``lut8`` (k-means palettization) or ``int8`` (linear symmetric).
    granularity: LUTs ``per_grouped_channel`` (default; one table per ``group_size`` output channels,
        iOS18+) or ``per_tensor`` (iOS16+); int8 is always ``per_channel``.
    group_size: output channels per LUT. 32 by default: coremltools then clusters each group with
        its exact 1-D k-means (it does so for fp16 groups of at least 10,000 weights, i.e. 32
        channels of 320+ inputs), which is also an order of magnitude faster than scikit-learn's.
    keep_fp16: ``fnmatch`` patterns over parameter names (``"model.layers.0.*"``) kept in fp16.
    keep_embeddings / keep_lm_head: keep the embedding table (a weight read by ``gather``) or the
        output projection (the last projection of the program) in fp16.
    keep_first_layers / keep_last_layers: keep the first / last N numbered layers (``layers.<i>.``)
        in fp16.
    per_layer: ``(pattern, scheme)`` pairs over parameter names; the first match overrides
        ``scheme`` (``"fp16"`` keeps the weight uncompressed), e.g. ``(("*.mlp.*", "lut4"),)``.
    weight_threshold: weights with fewer elements stay fp16 (norm scales, biases).
    block_size: integer per-block quantization; any value > 0 is refused (wrong output on the ANE).
    """

    scheme: str = "lut6"
    granularity: str = "per_grouped_channel"
    group_size: int = 32
    keep_fp16: tuple[str, ...] = ()
    keep_embeddings: bool = False
    keep_lm_head: bool = False
    keep_first_layers: int = 0
    keep_last_layers: int = 0
    per_layer: tuple[tuple[str, str], ...] = ()
    weight_threshold: int = 2048
    block_size: int = 0

    def schemes(self) -> set[str]:
        return {self.scheme} | {s for _, s in self.per_layer if s != _FP16}


def resolve(compression: str | CompressionOptions | None) -> CompressionOptions | None:
    """``"lut6"`` → ``CompressionOptions(scheme="lut6")``; checks the scheme (no OS check here)."""
    if compression is None:
        return None
    if isinstance(compression, str):
        compression = CompressionOptions(scheme=compression)
    if not isinstance(compression, CompressionOptions):
        raise AnefxError(
            f"compression must be a scheme name ({', '.join(SCHEMES)}) or CompressionOptions, "
            f"got {type(compression).__name__}"
        )
    if compression.block_size:
        raise AnefxError(
            f"compression block_size={compression.block_size} asks for per-block integer quantization, which is "
            "refused: per-block integer weights are reported to give wrong output on the Neural Engine "
            "(apple/coreai-models#279); use 'int8' (per channel) or a grouped-channel LUT ('lut4'/'lut6'/'lut8')"
        )
    for scheme in compression.schemes():
        if scheme in REFUSED:
            raise AnefxError(f"compression {scheme!r} is refused: {REFUSED[scheme]}")
        if scheme not in SCHEMES:
            raise AnefxError(
                f"unknown compression scheme {scheme!r}; choose one of {', '.join(SCHEMES)} (or None for fp16)"
            )
    if compression.granularity not in ("per_grouped_channel", "per_tensor"):
        raise AnefxError(
            f"compression granularity {compression.granularity!r} is not offered: LUTs are 'per_grouped_channel' "
            "(iOS18+) or 'per_tensor'; int8 is always per channel (per-block is refused: wrong output on the ANE)"
        )
    if compression.group_size < 1:
        raise AnefxError(f"compression group_size must be >= 1, got {compression.group_size}")
    return compression


def needs_ios18(options: CompressionOptions) -> bool:
    return options.granularity == "per_grouped_channel" and any(SCHEMES[s][0] == "palettize" for s in options.schemes())


def check_deployment_target(options: CompressionOptions, minimum_deployment_target: str) -> None:
    """Refuse a Core ML deployment target that cannot hold ``options``, before any long work starts."""
    if needs_ios18(options) and not _IOS18_PLUS.match(minimum_deployment_target):
        raise AnefxError(
            f"compression {options.scheme!r} with per_grouped_channel look-up tables needs iOS18/macOS15 or later "
            f"(constexpr_lut_to_dense gained per-group tables in the iOS18 opset), but minimum_deployment_target="
            f"{minimum_deployment_target!r}; raise it (CoreMLOptions(minimum_deployment_target='iOS18')) or use "
            "CompressionOptions(granularity='per_tensor') (one table per weight, iOS16+, lower quality)"
        )


# ---------------------------------------------------------------------------------------------
# Which weight is which: MIL consts ↔ FX nodes ↔ parameter names
# ---------------------------------------------------------------------------------------------


@dataclass
class WeightInfo:
    """One weight const of the converted program and what anefx decided for it."""

    const: str  # MIL const op name (e.g. view_8_to_fp16)
    node: str | None  # FX node of the exported program it is the value of (e.g. view_8)
    param: str | None  # the parameter it derives from (e.g. model.layers.0.self_attn.q_proj.weight)
    shape: tuple[int, ...]
    consumer: str  # MIL op type that reads it (conv, gather, …)
    role: str = ""  # "embedding", "lm_head", both ("embedding,lm_head": a tied table) or ""
    layer: int | None = None
    scheme: str = _FP16
    reason: str = ""  # why it stays fp16
    bytes_fp16: int = 0


def _param_of(ep, node_name: str) -> str | None:
    """Walk single-input chains (view, reshape, permute, t, _to_copy …) back to a parameter."""
    sig = ep.graph_signature
    to_param = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    nodes = {n.name: n for n in ep.graph.nodes}
    node = nodes.get(node_name)
    for _ in range(16):
        if node is None:
            return None
        if node.op == "placeholder":
            return to_param.get(node.name)
        tensor_inputs = [a for a in node.all_input_nodes]
        if len(tensor_inputs) != 1:
            return None
        node = tensor_inputs[0]
    return None


def node_of_const(name: str, node_names: set[str]) -> str | None:
    """The FX node a MIL const was named after (coremltools appends ``_to_fp16`` when it casts)."""
    for cand in (name, name.removesuffix("_to_fp16"), name.removesuffix("_to_fp32")):
        if cand in node_names:
            return cand
    return None


def weight_table(mlmodel, ep, threshold: int) -> list[WeightInfo]:
    """Every weight-sized const of ``main`` with its FX node, parameter, consumer and role."""
    ops = operations(mlmodel)
    node_names = {n.name for n in ep.graph.nodes}
    table: dict[str, WeightInfo] = {}
    for op in ops:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        if not isinstance(val, np.ndarray) or val.size < threshold or not np.issubdtype(val.dtype, np.floating):
            continue
        children = op.outputs[0].child_ops
        node = node_of_const(op.name, node_names)
        param = _param_of(ep, node) if node else None
        table[op.name] = WeightInfo(
            const=op.name,
            node=node,
            param=param,
            shape=tuple(int(s) for s in val.shape),
            consumer=",".join(sorted({c.op_type for c in children})),
            role="embedding" if any(c.op_type == "gather" for c in children) else "",
            layer=layer_of(param + ".") if param else None,
            bytes_fp16=int(val.size) * 2,
        )
    # the LM head: the weight of the program's last projection (a tied table is both roles)
    head = None
    for op in ops:
        if op.op_type in ("conv", "linear", "matmul"):
            for key in ("weight", "y"):
                var = op.inputs.get(key)
                if var is not None and var.op is not None and var.op.name in table:
                    head = table[var.op.name]
    if head is not None:
        head.role = ",".join(r for r in (head.role, "lm_head") if r)
    return list(table.values())


def plan(table: list[WeightInfo], options: CompressionOptions, reference_values: dict[str, Any]) -> list[WeightInfo]:
    """Decide each weight's scheme. ``reference_values``: FX node → its torch value (the check that the
    const and the node hold the same numbers; a const coremltools transformed stays fp16)."""
    layers = sorted({w.layer for w in table if w.layer is not None})
    first = set(layers[: options.keep_first_layers])
    last = set(layers[len(layers) - options.keep_last_layers :]) if options.keep_last_layers else set()
    for w in table:
        name = w.param or w.const
        w.scheme, w.reason = options.scheme, ""
        if w.node is None:
            w.scheme, w.reason = _FP16, "no torch counterpart (quality could not be measured)"
            continue
        if w.param is None:
            w.scheme, w.reason = _FP16, "not a parameter (a folded table or mask)"
            continue
        ref = reference_values.get(w.node)
        if ref is None or tuple(ref.shape) != w.shape:
            w.scheme, w.reason = _FP16, "torch value differs in shape (coremltools transformed it)"
            continue
        for pattern, scheme in options.per_layer:
            if fnmatch.fnmatchcase(name, pattern):
                w.scheme = scheme
                break
        if any(fnmatch.fnmatchcase(name, p) for p in options.keep_fp16):
            w.scheme, w.reason = _FP16, "keep_fp16"
        elif options.keep_embeddings and "embedding" in w.role:
            w.scheme, w.reason = _FP16, "keep_embeddings"
        elif options.keep_lm_head and "lm_head" in w.role:
            w.scheme, w.reason = _FP16, "keep_lm_head"
        elif w.layer is not None and (w.layer in first or w.layer in last):
            w.scheme, w.reason = _FP16, "keep_first_layers" if w.layer in first else "keep_last_layers"
        elif w.scheme == _FP16:
            w.reason = "per_layer"
    return table


class SharedKMeans:
    """coremltools' own k-means (``palettize_weights``' ``kmeans`` mode), memoized by each group's values.

    Given to :func:`compress_mlmodel` as ``lut_cache``, the palettizer runs in coremltools' ``custom``
    mode with this as its ``lut_function``: a weight group it has already clustered (the same weight
    in another function of a multifunction package, e.g. ``compile_lm``'s prefill and decode) gets the
    identical table and indices, so ``save_multifunction`` stores them once, and the second program
    costs no clustering."""

    def __init__(self):
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.hits = 0

    def lut_function(self, nbits: int):
        def lut_and_indices(val: np.ndarray):
            data = np.ascontiguousarray(val)
            key = (nbits, data.dtype.str, data.shape, hashlib.sha1(data.tobytes()).digest())
            if key in self._cache:
                self.hits += 1
            else:
                self._cache[key] = kmeans_lut_and_indices(data, nbits)
            return self._cache[key]

        return lut_and_indices


def _op_config(scheme: str, options: CompressionOptions, lut_cache: SharedKMeans | None = None):
    import coremltools.optimize.coreml as cto

    kind, bits = SCHEMES[scheme]
    if kind == "palettize":
        mode = {"mode": "kmeans", "nbits": bits}
        if lut_cache is not None:  # the same k-means, shared across programs
            mode = {"mode": "custom", "lut_function": lut_cache.lut_function(bits)}
        if options.granularity == "per_grouped_channel":
            return cto.OpPalettizerConfig(
                **mode,
                granularity="per_grouped_channel",
                group_size=options.group_size,
                weight_threshold=options.weight_threshold,
            )
        return cto.OpPalettizerConfig(**mode, granularity="per_tensor", weight_threshold=options.weight_threshold)
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=options.weight_threshold
    )


@dataclass
class CompressionResult:
    mlmodel: MLModel
    weights: list[WeightInfo]
    seconds: float
    seconds_per_scheme: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        by_scheme: dict[str, int] = {}
        for w in self.weights:
            by_scheme[w.scheme] = by_scheme.get(w.scheme, 0) + 1
        return {"weights": by_scheme, "seconds": round(self.seconds, 2)}


def compress_mlmodel(
    mlmodel,
    table: list[WeightInfo],
    options: CompressionOptions,
    lut_cache: SharedKMeans | None = None,
    events: Events | None = None,
) -> CompressionResult:
    """Apply the plan with coremltools: one palettize/quantize call per scheme in use (a stage each),
    each restricted by name to its weights (the others get ``None``: left alone). ``lut_cache``
    shares the k-means tables between programs holding the same weights (:class:`SharedKMeans`)."""
    import coremltools.optimize.coreml as cto

    events = events_of(events)
    per_scheme: dict[str, float] = {}
    schemes = sorted({w.scheme for w in table if w.scheme != _FP16}, key=lambda s: SCHEMES[s][0] != "linear")
    model = mlmodel
    for scheme in schemes:
        # only this scheme's weights are named; every other const falls to the (empty) global config
        config = _op_config(scheme, options, lut_cache)
        cfg = cto.OptimizationConfig(op_name_configs={w.const: config for w in table if w.scheme == scheme})
        fn = cto.palettize_weights if SCHEMES[scheme][0] == "palettize" else cto.linear_quantize_weights
        with events.stage(scheme), quiet_coremltools():  # also swallows coremltools' per-op tqdm bars (stderr)
            model = fn(model, cfg)
        per_scheme[scheme] = events.events[-1].seconds or 0.0
    return CompressionResult(model, table, sum(per_scheme.values()), per_scheme)


# ---------------------------------------------------------------------------------------------
# The hand-off: compress a converted artifact and measure what was shipped
# ---------------------------------------------------------------------------------------------


@dataclass
class Compressed:
    """A compression applied to one converted function: the plan, the measured quality and what is
    needed to measure more on the shipped weights (its weight swap over the exported program)."""

    options: CompressionOptions
    weights: list[WeightInfo]
    fp16_model: MLModel  #: the uncompressed function (the reference)
    model: MLModel  #: the compressed function
    swap: WeightSwap  #: runs the exported program with either set of weights
    quality: CompressionQuality
    seconds: float = 0.0
    #: compressed weights per scheme and coremltools' seconds
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return dict(self.info)

    @property
    def shipped(self) -> list[WeightInfo]:
        return [w for w in self.weights if w.scheme != _FP16]

    def overrides(self, variant: str) -> dict:
        """FX node → weight for ``"fp16"`` (the uncompressed package) or ``"compressed"``."""
        from anefx.targets import quality

        if variant == "fp16":
            values = quality.const_values(self.fp16_model, {w.const for w in self.shipped})
        elif variant == "compressed":
            values = quality.decompressed_weights(self.model)
        else:
            raise ValueError(f"variant is 'fp16' or 'compressed', got {variant!r}")
        return quality.overrides_for(self.swap, self.shipped, values)


@dataclass
class Compression:
    """The compression of a whole artifact: per package of the chain and per function, what was
    compressed and how well (``Compressed``); for language models, greedy-token agreement and KL
    against the fp16 weights (``lm``, measured by the front end on the shipped weights)."""

    options: CompressionOptions
    #: per package of the chain (one when unchunked), per function (the package's default first)
    packages: list[dict[str, Compressed]]
    default: str  #: the function whose figures :attr:`quality` gives
    seconds: float = 0.0
    lm: LMQuality | None = None

    @property
    def functions(self) -> dict[str, Compressed]:
        """Per function, its compression in the last package of the chain that holds it (the only
        one unchunked; an encoder-decoder's ``encode`` in its last encoder chunk)."""
        return {fn: c for package in self.packages for fn, c in package.items()}

    def _main(self, package: dict[str, Compressed]) -> Compressed:
        """The default function's compression in ``package``, or the package's own default's (a
        chunk without the default function: an encoder-decoder's encoder chunk)."""
        return package.get(self.default) or next(iter(package.values()))

    @property
    def quality(self) -> CompressionQuality:
        """Per-weight and end-to-end errors of the default function (of the last package when chunked)."""
        return self.functions[self.default].quality

    @property
    def weights(self) -> list[WeightInfo]:
        """The plan of the default function, over every package of the chain (a package without
        it: its own default's)."""
        return [w for package in self.packages for w in self._main(package).weights]

    @property
    def shipped(self) -> list[WeightInfo]:
        return [w for w in self.weights if w.scheme != _FP16]

    @property
    def size_ratio(self) -> float:
        """Weight bytes of the compressed programs over the fp16 programs' (consts at their MIL widths)."""
        parts = [self._main(package).quality for package in self.packages]
        fp16 = sum(q.bytes_fp16 for q in parts)
        return sum(q.bytes_compressed for q in parts) / fp16 if fp16 else 1.0

    def set_lm(self, lm: LMQuality) -> LMQuality:
        self.lm = self.quality.lm = lm
        return lm

    def summary(self) -> dict[str, Any]:
        out = dict(self.quality.summary())
        out["size_ratio"] = round(self.size_ratio, 4)
        if len(self.packages) > 1:
            out["chunks"] = len(self.packages)
        out["weights"] = self.functions[self.default].summary().get("weights", {})
        if self.lm is not None:
            out |= {
                "agreement": round(self.lm.agreement, 4),
                "mean_kl": float(f"{self.lm.mean_kl:.3g}"),
                "max_kl": float(f"{self.lm.max_kl:.3g}"),
                "tokens": self.lm.tokens,
                "prompts": self.lm.prompts,
            }
        out["seconds"] = round(self.seconds, 1)
        return out

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(self.quality.rich_table())
        console.print("compression: " + ", ".join(f"{k}={v}" for k, v in self.summary().items()))
        return buf.getvalue()


def compress_function(
    function: ConvertedFunction,
    options: CompressionOptions,
    inputs,
    lut_cache: SharedKMeans | None = None,
    events: Events | None = None,
) -> Compressed:
    """Compress one converted function's program per ``options`` and measure it on ``inputs`` (its
    value inputs, in the exported program's user-input order). Plans speak of the user's parameter
    names (``function.param_name``: what ``keep_fp16``, ``per_layer`` and the layer options match)."""
    from anefx.targets import quality

    ep = function.exported_program
    if ep is None:
        raise AnefxError(f"compression of {function.name!r} needs the exported program it was converted from")
    mlmodel = function.model
    swap = quality.WeightSwap(ep)
    table = weight_table(mlmodel, ep, options.weight_threshold)
    for w in table:
        if w.param:
            w.param = function.user_param_name(w.param)
            w.layer = layer_of(w.param + ".")
    nodes = {w.node for w in table if w.node}
    values = swap.node_values(nodes, inputs)
    fp16 = quality.const_values(mlmodel, {w.const for w in table})
    for w in table:  # the const must hold the node's numbers (else coremltools transformed it)
        ref = values.get(w.node) if w.node else None
        if ref is not None and tuple(ref.shape) == w.shape:
            err = float((torch_from(fp16[w.const]) - ref.detach().float()).abs().max())
            if err > 1e-3 * max(float(ref.detach().abs().max()), 1e-6) + 1e-6:
                values.pop(w.node)
    plan(table, options, values)
    result = compress_mlmodel(mlmodel, table, options, lut_cache, events)
    measured = quality.measure(swap, table, mlmodel, result.mlmodel, inputs, options.scheme)
    return Compressed(options, table, mlmodel, result.mlmodel, swap, measured, result.seconds, result.summary())


def torch_from(val: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(val, dtype=np.float32))


def bytes_per_weight(compression) -> float:
    """Stored bytes per weight for the cap: 2 (fp16), or the scheme's bits plus its tables (3%)
    when every weight is compressed (with weights kept in fp16, 2 stays the safe figure)."""
    if compression is None:
        return 2.0
    if compression.keep_fp16 or compression.keep_embeddings or compression.keep_lm_head or compression.per_layer:
        return 2.0
    if compression.keep_first_layers or compression.keep_last_layers:
        return 2.0
    return SCHEMES[compression.scheme][1] / 8 * 1.03
