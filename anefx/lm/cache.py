"""The KV cache of a compiled causal LM: its layout, the ``transformers`` cache that writes it, and its masks.

How the cache is plugged into a stock model (the rule, the same for every architecture): anefx calls the
model the way ``transformers``' own static-cache export does, ``model(input_ids=…, position_ids=…,
past_key_values=cache, use_cache=True)``, with ``cache`` a ``transformers.Cache`` whose layers behave
like ``StaticLayer`` (fixed length, compileable). The model's own code then does everything
model-specific: rotary embeddings from ``position_ids``, QK-norm, GQA, soft-capping, and its causal
masks, which ``transformers`` builds from the cache's ``get_mask_sizes`` (``context`` keys from slot 0)
and ``get_query_offset`` (the first position of the chunk, read from the ``position_ids`` input). No
modeling file is patched and no architecture is special-cased.

**Layout.** One layer's K state and V state are each ``(1, kv_heads, head_dim, length)``: the keys
(values) of one head are a ``(head_dim, length)`` plane whose last axis runs over positions. This is
the layout the attention products read as they lie: ``scores = q (1, H_kv, G, D) @ K`` and
``out = w (1, H_kv, G, S) @ V^T`` (a ``matmul`` with ``transpose_y``), so a decode step moves no
cache-sized tensor through a transpose, a reshape or a split, and its score rows are (…, S) with the
keys on the padded last axis (not the one query). ``length`` is a multiple of 32 (Core ML states
whose width is not fail on the ANE: apple/coremltools#2631).

**Writes.** A decode step writes one column per state: :func:`anefx.ir.ops.cache_write` at the
slot, which Core ML lowers to one ``slice_update`` on the state (in place; how Anemll and
CoreML-LLM write their KV caches on device). A prefill chunk of ``T`` tokens writes with a one-hot
product, ``cache * (1 - sum_t O[t]) + new @ O`` where ``O[t, j] = 1`` when token ``t`` is the last of
the chunk to land in slot ``j`` and its position is below ``context``: no run-time index (Anemll
reports multi-column ``slice_update`` failing on the ANE, Anemll/Anemll#27), and padding positions
``>= context`` write nothing, which is how a short last chunk is padded.

**Sliding windows.** A layer with a sliding window shorter than the context (``transformers``' own
rule: ``DynamicCache(config=…)`` makes it a sliding layer) keeps a ring buffer of the window rounded up
to 32: position ``p`` lives in slot ``p mod length``. Attention over a ring is exact because a key's
rotary phase is applied before it is cached and a softmax does not depend on the order of its keys;
only the mask must know which position each slot holds. anefx computes those masks from the
positions (:func:`attention_masks`) and hands them to the model as its ``attention_mask`` (one 4-D mask,
or a dict by layer type when full and sliding layers mix, the form ``transformers`` models accept).
A prefill chunk attends to the ring as it was before the chunk followed by the chunk's own keys: a
chunk longer than the ring overwrites slots that its own first tokens still read.

Layers of the two kinds keep states of two shapes (context and ring length). Anemll reports that
M1/A14's ANE compiler rejects states of different shapes in one program; newer chips accept them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from anefx.driver.validate import Tolerance, ValidationOptions
from anefx.ir.errors import AnefxError
from anefx.ir.ops import cache_write
from anefx.targets.verify import ArtifactCheckOptions

ALIGN = 32


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class LayerCache:
    """Shapes of one attention layer's cache as the model computes it."""

    kv_heads: int
    key_dim: int
    value_dim: int
    window: int | None = None  #: a sliding window shorter than the context: a ring buffer of this many keys

    @property
    def key_channels(self) -> int:
        return self.kv_heads * self.key_dim

    @property
    def value_channels(self) -> int:
        return self.kv_heads * self.value_dim


@dataclass(frozen=True)
class CacheLayout:
    """Every layer's cache shapes and the padded context length; names the Core ML states.

    ``names``: the prefixes of the K and V state names (``key_cache_<i>``, ``value_cache_<i>`` for a
    decoder's self-attention, a causal LM's or an encoder-decoder's; the cross-attention states of
    an encoder-decoder are named and laid out otherwise, :class:`anefx.lm.encoder_decoder.CrossLayout`)."""

    layers: tuple[LayerCache, ...]
    context: int
    dtype: torch.dtype = torch.float32
    names: tuple[str, str] = ("key_cache", "value_cache")

    def length(self, i: int) -> int:
        """Slots of layer ``i``'s states: the context, or its ring's length (the window rounded up to 32)."""
        window = self.layers[i].window
        return self.context if window is None else min(self.context, round_up(window))

    def is_ring(self, i: int) -> bool:
        return self.length(i) < self.context

    @property
    def rings(self) -> bool:
        return any(self.is_ring(i) for i in range(len(self.layers)))

    @property
    def state_names(self) -> list[str]:
        n = len(self.layers)
        keys, values = self.names
        return [f"{keys}_{i}" for i in range(n)] + [f"{values}_{i}" for i in range(n)]

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        keys = [(1, lc.kv_heads, lc.key_dim, self.length(i)) for i, lc in enumerate(self.layers)]
        values = [(1, lc.kv_heads, lc.value_dim, self.length(i)) for i, lc in enumerate(self.layers)]
        return keys + values

    @property
    def states(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.state_names, self.state_shapes, strict=True))

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=self.dtype) for s in self.state_shapes]

    def state_bytes(self, itemsize: int = 2) -> int:
        """Bytes of all states (fp16 on Core ML)."""
        return sum(itemsize * torch.Size(s).numel() for s in self.state_shapes)


def chunk_one_hot(position_ids: torch.Tensor, length: int, context: int, dtype: torch.dtype) -> torch.Tensor:
    """``O[t, j] = 1`` when token ``t`` of the chunk is written to slot ``j`` of a cache of ``length``
    slots (``p mod length``; equal to ``p`` for a full cache): the last token of the chunk to land in
    that slot, at a position below ``context`` (padding beyond writes nothing). A (T, length) matrix
    computed from the positions without indexing."""
    p = position_ids[0].to(torch.int64)
    slots = torch.arange(length, dtype=torch.int64, device=p.device)
    tokens = p.shape[0]
    later = torch.arange(tokens, device=p.device).unsqueeze(0) > torch.arange(tokens, device=p.device).unsqueeze(1)
    # a full cache's slot is the position itself: no remainder, which Core AI's converter lacks
    slot = torch.remainder(p, length) if length < context else p
    same_slot = slot.unsqueeze(0) == slot.unsqueeze(1)
    valid = (p >= 0) & (p < context)
    overwritten = (later & same_slot & valid.unsqueeze(0)).any(1)  # a later token of the chunk lands there too
    hit = slot.unsqueeze(-1) == slots
    return (hit & (valid & ~overwritten).unsqueeze(-1)).to(dtype)


def write_chunk(state: torch.Tensor, new: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """``state`` (1, H, D, L) with ``new`` (1, H, D, T) written at the one-hot slots ``one_hot`` (T, L)."""
    keep = 1.0 - one_hot.sum(0)
    return state * keep + torch.matmul(new, one_hot)


def write_column(state: torch.Tensor, new: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``state`` (1, H, D, L) with the one column ``new`` (1, H, D, 1) written at ``slot`` (a run-time
    position tensor): one ``slice_update`` on Core ML."""
    return cache_write(state, new, slot, 3)


def ring_positions(last: torch.Tensor, length: int) -> torch.Tensor:
    """The position each slot of a ring of ``length`` slots holds once position ``last`` (a (1,)
    tensor) is written: ``last - ((last - j) mod length)``; negative for a slot never written."""
    slots = torch.arange(length, dtype=torch.int64, device=last.device)
    last = last.to(torch.int64)
    return last - torch.remainder(last - slots, length)


def visible_keys(layout: CacheLayout, i: int, position_ids: torch.Tensor) -> torch.Tensor:
    """Which keys each query of the chunk sees in layer ``i``: a bool (1, 1, T, K) mask over the keys
    :meth:`make_cache`'s layer returns (the cache's slots; for a ring in a prefill chunk, the ring as it
    was followed by the chunk's own keys). A key is visible when it is written, not after the query
    and, for a sliding layer, less than the window before it."""
    q = position_ids[0].to(torch.int64).unsqueeze(-1)  # (T, 1)
    length, tokens = layout.length(i), position_ids.shape[1]
    window = layout.layers[i].window
    if not layout.is_ring(i):
        keys = torch.arange(length, dtype=torch.int64, device=q.device).unsqueeze(0)
        seen = keys <= q
        if window is not None:
            seen = seen & (q - keys < window)
        return seen.view(1, 1, tokens, length)
    if tokens == 1:
        held = ring_positions(position_ids[0, :1], length).unsqueeze(0)
        seen = (held >= 0) & (q - held < window)
    else:
        held = ring_positions(position_ids[0, :1] - 1, length).unsqueeze(0)  # before the chunk
        old = (held >= 0) & (q - held < window)
        own = position_ids[0].to(torch.int64).unsqueeze(0)  # (1, T)
        mine = (own >= 0) & (own <= q) & (q - own < window)  # padding before a prompt: negative positions
        seen = torch.cat([old, mine], dim=-1)
    return seen.view(1, 1, tokens, seen.shape[-1])


def attention_masks(model, layout: CacheLayout, position_ids: torch.Tensor, dtype: torch.dtype):
    """The ``attention_mask`` argument that makes the model attend over ring buffers correctly (None
    when no layer has one: the model's own mask code is then exact): one 4-D mask when every layer
    is of one kind, else a dict keyed by the ``transformers`` layer type."""
    if not layout.rings:
        return None
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")

    def spelled(seen: torch.Tensor) -> torch.Tensor:
        if implementation in ("sdpa", "flex_attention"):
            return seen
        return torch.where(seen, 0.0, torch.finfo(dtype).min).to(dtype)  # eager: added to the scores

    kinds = {"sliding_attention" if layout.is_ring(i) else "full_attention": i for i in range(len(layout.layers))}
    masks = {kind: spelled(visible_keys(layout, i, position_ids)) for kind, i in kinds.items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _cache_base():
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


def make_cache(layout: CacheLayout, states: list[torch.Tensor], position_ids: torch.Tensor):
    """A ``transformers`` cache over ``states`` (keys then values) for one call at ``position_ids``.

    After the model ran, ``cache.new_states`` holds the updated state tensors (same order)."""
    Cache, CacheLayerMixin = _cache_base()
    n = len(layout.layers)
    offset = position_ids[0, 0]
    one_hots: dict[int, torch.Tensor] = {}

    class SlotLayer(CacheLayerMixin):
        is_compileable = True

        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.is_initialized = True
            self.is_sliding = layout.is_ring(index)

        def lazy_initialization(self, key_states, value_states):  # pragma: no cover - never lazy
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            i = self.index
            spec = layout.layers[i]
            b, h, t, d = key_states.shape
            if (b, h, d) != (1, spec.kv_heads, spec.key_dim) or value_states.shape[-1] != spec.value_dim:
                raise AnefxError(
                    f"layer {i} produced keys {tuple(key_states.shape)} / values {tuple(value_states.shape)}, "
                    f"but its cache was laid out for {spec}: the model's cache shapes changed between calls"
                )
            length = layout.length(i)
            new_k, new_v = key_states.transpose(2, 3), value_states.transpose(2, 3)  # (1, H, D, T)
            if t == 1:
                slot = torch.remainder(position_ids, length) if layout.is_ring(i) else position_ids
                keys, values = write_column(states[i], new_k, slot), write_column(states[n + i], new_v, slot)
            else:
                if length not in one_hots:
                    one_hots[length] = chunk_one_hot(position_ids, length, layout.context, states[i].dtype)
                keys = write_chunk(states[i], new_k, one_hots[length])
                values = write_chunk(states[n + i], new_v, one_hots[length])
            cache.new_states[i] = keys
            cache.new_states[n + i] = values
            if layout.is_ring(i) and t > 1:  # the ring before the chunk, then the chunk's own keys
                keys = torch.cat([states[i], new_k], dim=3)
                values = torch.cat([states[n + i], new_v], dim=3)
            return keys.transpose(2, 3), values.transpose(2, 3)  # (1, H, K, D), as the model expects

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return layout.context, 0

        def get_seq_length(self):
            return offset

        def get_max_length(self) -> int:
            return layout.context

    class SlotCache(Cache):
        def __init__(self):
            super().__init__(layers=[SlotLayer(i) for i in range(n)])
            self.new_states: list[torch.Tensor | None] = [None] * (2 * n)

    cache = SlotCache()
    return cache


class _ProbeCache:
    """Records the key/value shapes each layer hands to the cache (one eager call, no export); laid
    out by ``transformers`` from the model's config, so that its layers say which ones slide."""

    def __new__(cls, config=None):
        from transformers.cache_utils import DynamicCache

        class Probe(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                self.shapes[layer_idx] = (tuple(key_states.shape), tuple(value_states.shape))
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        probe = Probe(config=config) if config is not None else Probe()
        probe.shapes = {}
        return probe


def _sliding_windows(probe, n: int) -> list[int | None]:
    """Each layer's sliding window as ``transformers`` lays its cache out (None: full attention)."""
    layers = getattr(probe, "layers", [])
    out: list[int | None] = []
    for i in range(n):
        layer = layers[i] if i < len(layers) else None
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        out.append(int(window) if window is not None else None)
    return out


def probe_layout(model: torch.nn.Module, context: int, dtype: torch.dtype) -> tuple[CacheLayout, int]:
    """Every layer's cache shapes, sliding windows and the vocabulary size, from one eager call on one
    token with a recording cache."""
    config = getattr(model, "config", None)
    try:
        probe = _ProbeCache(config if hasattr(config, "get_text_config") else None)
    except Exception:  # a config transformers cannot lay a cache out for: probe without it
        probe = _ProbeCache()
    ids = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        logits = call_model(model, ids, torch.zeros(1, 1, dtype=torch.long), probe)
    if not probe.shapes:
        raise AnefxError(
            "the model never called past_key_values.update(...): compile_lm needs a causal LM that keeps a "
            "transformers Cache (a *ForCausalLM, or a module with the same call convention)"
        )
    if sorted(probe.shapes) != list(range(len(probe.shapes))):
        raise AnefxError(f"the model updated the cache of layers {sorted(probe.shapes)}; expected 0..n-1")
    windows = _sliding_windows(probe, len(probe.shapes))
    layers = []
    for i in range(len(probe.shapes)):
        (b, h, t, dk), (_, hv, _, dv) = probe.shapes[i]
        if b != 1 or t != 1 or hv != h:
            raise AnefxError(f"layer {i} cached keys {probe.shapes[i][0]} and values {probe.shapes[i][1]}: unsupported")
        layers.append(LayerCache(h, dk, dv, windows[i]))
    return CacheLayout(tuple(layers), round_up(context), dtype), int(logits.shape[-1])


def call_model(model, input_ids, position_ids, cache, attention_mask=None, last_only: bool = False):
    """The call convention compile_lm relies on; returns the logits (of the last position only with
    ``last_only``: through the model's own ``logits_to_keep=1`` when it has one, so that its head runs
    on that position alone)."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    keep = last_only and _takes(model, "logits_to_keep")
    if keep:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True, **kwargs)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise AnefxError(
            f"the model returned {type(out).__name__} without logits: compile_lm needs outputs with .logits "
            "or a tuple whose first element is the logits"
        )
    return logits[:, -1:] if last_only and not keep else logits


def _takes(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class StepFunction(torch.nn.Module):
    """One generation step as a pure function: ``(input_ids, position_ids, *states) -> (logits, *states')``;
    with ``last_only`` (prefill) the logits are (1, 1, vocab), of the chunk's last position.

    This is what the anefx pipeline rewrites and validates: the states are ordinary inputs, so each
    pass is checked on random caches (no state carried between validation runs)."""

    def __init__(self, model: torch.nn.Module, layout: CacheLayout, last_only: bool = False):
        super().__init__()
        self.model = model
        self.layout = layout
        self.last_only = last_only  #: a prefill: the logits of the chunk's last position only

    def forward(self, input_ids, position_ids, *states):
        cache = make_cache(self.layout, list(states), position_ids)
        masks = attention_masks(self.model, self.layout, position_ids, states[0].dtype)
        logits = call_model(self.model, input_ids, position_ids, cache, masks, self.last_only)
        missing = [self.layout.state_names[i] for i, s in enumerate(cache.new_states) if s is None]
        if missing:
            raise AnefxError(f"the model never updated the caches {missing}")
        return (logits, *cache.new_states)


def takes_negative_positions(model) -> bool:
    """Whether the model runs on a negative position (rotary embeddings do; a learned position
    embedding raises): the padding in front of a prompt's first prefill chunk needs it."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.tensor([[-1, 0]]), use_cache=False)
    except Exception:
        return False
    return True


#: Per-pass validation of an LM step, relative to the largest output value (logits reach tens: an
#: absolute 1e-4 would roll back any re-association of a 30-layer sum). The program runs in fp16,
#: whose own error is ~1e-2; the end-to-end greedy-token check is the final word.
LM_RELATIVE_TOLERANCE = 1e-3


def scaled_tolerances(captured, options: ValidationOptions) -> dict:
    """fp32 tolerance ``atol = 1e-3 * max|y|`` over the step's outputs (logits and caches)."""
    scale = max(
        (
            float(t.detach().abs().max())
            for t in captured.reference_outputs
            if isinstance(t, torch.Tensor) and t.numel()
        ),
        default=1.0,
    )
    tolerances = dict(options.tolerances)
    base = options.tolerance(torch.float32)
    tolerances[torch.float32] = Tolerance(
        max(base.atol, LM_RELATIVE_TOLERANCE * scale), max(base.rtol, LM_RELATIVE_TOLERANCE)
    )
    return tolerances


#: The executed fp16 step's tolerance, relative to each output's scale (the logits' largest
#: magnitude), for a decoder of up to ``LM_ARTIFACT_DEPTH`` layers: a decoder step reads a cache of
#: fp16 values through every layer's attention, and a random-weight model's logits come out within
#: 1-2 % of their scale (a wrong program is off by its whole scale); the end-to-end greedy-token
#: check is the final word. Deeper decoders accumulate fp16 rounding as a random walk, so the
#: tolerance grows with the square root of the depth (:func:`lm_artifact_tolerance`): SmolLM2-135M
#: (30 layers) on the validation's random caches measured 4.4e-2 in its last value cache, within
#: its 5.8e-2.
LM_ARTIFACT_TOLERANCE = 3e-2
LM_ARTIFACT_DEPTH = 8


#: An LM step's fp16 output that fails its tolerance passes within this many times the error of its
#: own graph executed with every value rounded to fp16 (:func:`~anefx.targets.verify.fp16_rounding_floor`):
#: the tolerance above assumes a well-conditioned model, and some amplify fp16's rounding by
#: themselves. A tiny random T5 of 4 layers (unscaled attention, logits up to ~30: a relative error δ
#: of a query moves a logit by 30δ; the error doubles per encoder layer) measured 0.0308 of the scale
#: in ``encode``'s ``cross_key_0``, its ideal fp16 execution 0.0361, its fp32 program 4e-4: no
#: conversion error, fp16's own. Two executions that round at different places (accumulation order,
#: casts, fused ops) draw from the same error distribution: twice the floor bounds the program's.
LM_FP16_NOISE_MARGIN = 2.0


def lm_depth_factor(layers: int) -> float:
    """How much more rounding a decoder of ``layers`` layers accumulates than one of
    ``LM_ARTIFACT_DEPTH``: the factor on an LM step's artifact tolerances (fp16 and fp32; Core AI's
    fp32 program of SmolLM2 measured 1.8e-4 in a value cache against PyTorch, its tolerance 1.9e-4)."""
    return max(1.0, math.sqrt(layers / LM_ARTIFACT_DEPTH))


def lm_artifact_tolerance(layers: int) -> float:
    """The executed fp16 step's tolerance for a decoder of ``layers`` layers."""
    return LM_ARTIFACT_TOLERANCE * lm_depth_factor(layers)


def depth_scaled_check(plan, given, layers: int):
    """``plan`` with an LM step's artifact tolerances for a decoder of ``layers`` layers (fp16:
    :func:`lm_artifact_tolerance`, or within ``LM_FP16_NOISE_MARGIN`` times the model's own fp16
    floor; fp32: the plan's own times :func:`lm_depth_factor`), unless the
    caller gave ``ArtifactCheckOptions`` of its own (``given``: the ``artifact_check`` asked for).
    Every function of the step's program (``prefill``/``decode``, and an encoder-decoder's ``encode``)
    and every chunk is checked with them."""
    if isinstance(given, ArtifactCheckOptions):
        return plan
    factor = lm_depth_factor(layers)
    checked = dataclasses.replace(
        plan.artifact_check,
        fp16_tolerance=lm_artifact_tolerance(layers),
        fp32_tolerance=plan.artifact_check.fp32_tolerance * factor,
        fp16_noise_margin=LM_FP16_NOISE_MARGIN,
    )
    return dataclasses.replace(plan, artifact_check=checked)
