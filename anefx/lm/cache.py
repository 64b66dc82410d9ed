"""The KV cache of a compiled causal LM: its layout, and the ``transformers`` cache that writes it.

How the cache is plugged into a stock model (the rule, the same for every architecture): anefx calls the
model the way ``transformers``' own static-cache export does, ``model(input_ids=…, position_ids=…,
past_key_values=cache, use_cache=True)``, with ``cache`` an instance of :class:`OneHotCache`, a
``transformers.Cache`` whose layers behave like ``StaticLayer`` (fixed length, compileable, never
sliding). The model's own code then does everything model-specific: rotary embeddings from
``position_ids``, QK-norm, GQA, and its causal / sliding-window masks, which ``transformers`` builds from
the cache's ``get_mask_sizes`` (``context`` keys from slot 0) and ``get_query_offset`` (the first
position of the chunk, read from the ``position_ids`` input). No modeling file is patched and no
architecture is special-cased.

The layout of one layer's K (and V) state: ``(1, C, 1, context)`` with ``C = kv_heads * head_dim``,
channels-first like every (B, C, 1, S) activation on the ANE, both ``C`` and ``context`` padded to
multiples of 32. Slot ``j`` holds the key of position ``j``.

The update at the positions ``p`` of the chunk never indexes at run time: with the one-hot matrix
``O[t, j] = (p[t] == j)`` built by comparing ``position_ids`` with a constant ``arange``,
``cache' = cache * (1 - sum_t O[t]) + new @ O``: an elementwise product for one token, a product with
the one-hot matrix for a chunk. A position outside ``[0, context)`` writes nothing, which is how the
padding of a last, partial prefill chunk is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anefx.driver.validate import Tolerance, ValidationOptions
from anefx.ir.errors import AnefxError

ALIGN = 32


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class LayerCache:
    """Shapes of one attention layer's cache as the model computes it."""

    kv_heads: int
    key_dim: int
    value_dim: int

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
    decoder's self-attention; an encoder-decoder's cross-attention states use the same layout under
    other names, its ``context`` the encoder's padded length)."""

    layers: tuple[LayerCache, ...]
    context: int
    dtype: torch.dtype = torch.float32
    names: tuple[str, str] = ("key_cache", "value_cache")
    #: keys stored ``(1, context, 1, C)``: the layout the per-head score product reads (``bkhc``), so
    #: that reading them needs no transpose (values stay ``(1, C, 1, context)``)
    keys_transposed: bool = False

    @property
    def state_names(self) -> list[str]:
        n = len(self.layers)
        keys, values = self.names
        return [f"{keys}_{i}" for i in range(n)] + [f"{values}_{i}" for i in range(n)]

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        keys = [
            (1, self.context, 1, round_up(lc.key_channels))
            if self.keys_transposed
            else (1, round_up(lc.key_channels), 1, self.context)
            for lc in self.layers
        ]
        values = [(1, round_up(lc.value_channels), 1, self.context) for lc in self.layers]
        return keys + values

    @property
    def states(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.state_names, self.state_shapes, strict=True))

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=self.dtype) for s in self.state_shapes]

    def state_bytes(self, itemsize: int = 2) -> int:
        """Bytes of all states (fp16 on Core ML)."""
        return sum(itemsize * torch.Size(s).numel() for s in self.state_shapes)


def one_hot_positions(position_ids: torch.Tensor, context: int, dtype: torch.dtype) -> torch.Tensor:
    """``O[t, j] = (position_ids[0, t] == j)`` as a (T, context) float matrix (no indexing)."""
    slots = torch.arange(context, dtype=position_ids.dtype, device=position_ids.device)
    return (position_ids[0].unsqueeze(-1) == slots).to(dtype)


def write_one_hot(cache: torch.Tensor, new: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """``cache`` (1, Cpad, 1, ctx) with ``new`` (1, C, T) written at the one-hot slots, channels
    ``C..Cpad`` kept at zero. Everything stays (B, C, 1, S): what attention then reads of the cache
    is a channel block per head of a channels-first tensor, which attention_bc1s splits per head
    without a layout change."""
    channels, tokens = new.shape[1], new.shape[2]
    old = cache[:, :channels]
    new = new.unsqueeze(2)
    if tokens == 1:
        keep = 1.0 - one_hot[0]
        written = new * one_hot[0]
    else:
        keep = 1.0 - one_hot.sum(0)
        written = torch.matmul(new, one_hot)
    updated = old * keep + written
    pad = cache.shape[1] - channels
    if pad:
        updated = torch.cat([updated, updated.new_zeros(1, pad, 1, cache.shape[3])], dim=1)
    return updated


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Keys or values as a model hands them to its cache, (1, H, T, D), as cache channels (1, H·D, T)."""
    _, h, t, d = x.shape
    return x.transpose(2, 3).reshape(1, h * d, t)


def heads_of(state: torch.Tensor, heads: int, dim: int, transposed: bool = False) -> torch.Tensor:
    """A (1, Cpad, 1, L) state (``transposed``: (1, L, 1, Cpad)) read back as the model's
    (1, heads, L, dim) keys or values."""
    if transposed:
        return state[..., : heads * dim].reshape(1, state.shape[1], heads, dim).transpose(1, 2)
    return state[:, : heads * dim].reshape(1, heads, dim, state.shape[3]).transpose(2, 3)


def _cache_base():
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


def make_cache(layout: CacheLayout, states: list[torch.Tensor], position_ids: torch.Tensor):
    """A ``transformers`` cache over ``states`` (keys then values) for one call at ``position_ids``.

    After the model ran, ``cache.new_states`` holds the updated state tensors (same order)."""
    Cache, CacheLayerMixin = _cache_base()
    n = len(layout.layers)
    one_hot = one_hot_positions(position_ids, layout.context, layout.dtype)
    offset = position_ids[0, 0]

    class OneHotLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states):  # pragma: no cover - never lazy
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            i = self.index
            spec = layout.layers[i]
            b, h, _, d = key_states.shape
            if (b, h, d) != (1, spec.kv_heads, spec.key_dim) or value_states.shape[-1] != spec.value_dim:
                raise AnefxError(
                    f"layer {i} produced keys {tuple(key_states.shape)} / values {tuple(value_states.shape)}, "
                    f"but its cache was laid out for {spec}: the model's cache shapes changed between calls"
                )
            keys = write_one_hot(states[i], channels_first(key_states), one_hot)
            values = write_one_hot(states[n + i], channels_first(value_states), one_hot)
            cache.new_states[i] = keys
            cache.new_states[n + i] = values
            return heads_of(keys, h, d), heads_of(values, h, value_states.shape[-1])

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return layout.context, 0

        def get_seq_length(self):
            return offset

        def get_max_length(self) -> int:
            return layout.context

    class OneHotCache(Cache):
        def __init__(self):
            super().__init__(layers=[OneHotLayer(i) for i in range(n)])
            self.new_states: list[torch.Tensor | None] = [None] * (2 * n)

    cache = OneHotCache()
    return cache


class _ProbeCache:
    """Records the key/value shapes each layer hands to the cache (one eager call, no export)."""

    def __new__(cls):
        from transformers.cache_utils import DynamicCache

        class Probe(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                self.shapes[layer_idx] = (tuple(key_states.shape), tuple(value_states.shape))
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        probe = Probe()
        probe.shapes = {}
        return probe


def probe_layout(model: torch.nn.Module, context: int, dtype: torch.dtype) -> tuple[CacheLayout, int]:
    """Every layer's cache shapes and the vocabulary size, from one eager call on one token with a
    recording cache."""
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
    layers = []
    for i in range(len(probe.shapes)):
        (b, h, t, dk), (_, hv, _, dv) = probe.shapes[i]
        if b != 1 or t != 1 or hv != h:
            raise AnefxError(f"layer {i} cached keys {probe.shapes[i][0]} and values {probe.shapes[i][1]}: unsupported")
        layers.append(LayerCache(h, dk, dv))
    return CacheLayout(tuple(layers), round_up(context), dtype), int(logits.shape[-1])


def call_model(model, input_ids, position_ids, cache):
    """The call convention compile_lm relies on; returns the logits."""
    out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise AnefxError(
            f"the model returned {type(out).__name__} without logits: compile_lm needs outputs with .logits "
            "or a tuple whose first element is the logits"
        )
    return logits


class StepFunction(torch.nn.Module):
    """One generation step as a pure function: ``(input_ids, position_ids, *states) -> (logits, *states')``.

    This is what the anefx pipeline rewrites and validates: the states are ordinary inputs, so each
    pass is checked on random caches (no state carried between validation runs)."""

    def __init__(self, model: torch.nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids, position_ids, *states):
        cache = make_cache(self.layout, list(states), position_ids)
        logits = call_model(self.model, input_ids, position_ids, cache)
        missing = [self.layout.state_names[i] for i, s in enumerate(cache.new_states) if s is None]
        if missing:
            raise AnefxError(f"the model never updated the caches {missing}")
        return (logits, *cache.new_states)


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
