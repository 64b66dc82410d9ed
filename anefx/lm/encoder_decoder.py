"""Encoder-decoder models (Whisper, T5, BART …) as three pure step functions that share weights.

* ``encode(inputs[, attention_mask]) -> (encoder_length, *cross states, encoder_mask)``: the encoder, then every
  decoder layer's cross-attention K and V projections of its output, each written into a
  cross-attention state (:class:`CrossLayout`: keys-last ``(1, heads, head_dim, S)`` as the
  self-attention caches, ``S`` the encoder's length padded to a multiple of 32).
  ``encoder_mask`` ``(1, 1, 1, S)`` is the encoder's padding mask as the additive bias attention
  adds to its scores (0 kept, :data:`MASKED` for the source's padding and the states' padding
  slots): it travels with the states, so the decoder never recomputes it; the model gets it as a
  4-D mask, which ``transformers``' mask code passes through as it is.
* ``prefill`` / ``decode``: ``(input_ids, position_ids, *self states, *cross states, encoder_mask)
  -> (logits, *self states')``: the decoder with its self-attention KV states exactly as a causal
  LM's (:func:`~anefx.lm.cache.make_cache`: keys-last ``(1, kv_heads, head_dim, context)``, a
  decode step writes one column), cross-attention reading the cross states; as a causal LM's,
  ``prefill`` returns the logits of its chunk's last position only.

How the model is called (the rule, the same for every architecture): the model's own forward, as
``transformers`` calls it during generation, ``model(decoder_input_ids=…, encoder_outputs=…,
attention_mask=encoder_mask, past_key_values=EncoderDecoderCache(self, cross), use_cache=True)``.
Its cross-attention layers compute K and V from the encoder output when the cross cache is empty
(``encode`` records them into the states) and read them from the cache otherwise (``prefill`` and
``decode``: the encoder output passed is a placeholder of the right shape that nothing reads).

Two things the stock code does that anefx changes, each in a *view* of the model (shallow copies
along the path to the adapted module, whose ``forward`` is wrapped; every parameter, with its name,
is the user's own, and the user's model is never modified), found by what a module has rather than
by its class:

* a relative position bias (a module with ``relative_attention_bias`` and ``compute_bias``: T5 and
  its family) is a table per head computed once with the model's own ``compute_bias``: over the
  decoder positions for the decoder (``(H·context, context)``, the chunk's rows picked by a one-hot
  of its positions: no bucket arithmetic, no gather at run time), and whole for the encoder, whose
  length is fixed;
* a decoder layer that takes an ``encoder_attention_mask`` but is called without one (Whisper's
  decoder has no encoder mask) gets the encoder mask: the cross states are padded to a multiple of
  32 and the padding slots must not be attended.
"""

from __future__ import annotations

import copy
import inspect
import types
from dataclasses import dataclass

import torch

from anefx.ir.errors import AnefxError
from anefx.lm.cache import (
    CacheLayout,
    LayerCache,
    _ProbeCache,
    make_cache,
    round_up,
)

CROSS_NAMES = ("cross_key", "cross_value")
ENCODER_MASK = "encoder_mask"
#: the encoder mask's value at a masked position: finite in fp16, and zero weight after a softmax
MASKED = -1e4


def encoder_bias(keep: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """A (1, S) keep-mask (1 keep, 0 masked) as the (1, 1, 1, ``length``) additive bias, masked beyond S."""
    keep = keep.reshape(1, -1)
    if length is not None:
        keep = torch.nn.functional.pad(keep, (0, length - keep.shape[1]))
    return ((1.0 - keep) * MASKED).reshape(1, 1, 1, -1)


@dataclass(frozen=True)
class SourceSpec:
    """The encoder's main input: its name (``input_features`` for Whisper, ``input_ids`` for text),
    the fixed shape it is compiled at and whether ``encode`` also takes an ``attention_mask``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    takes_mask: bool

    @property
    def is_tokens(self) -> bool:
        return not self.dtype.is_floating_point


@dataclass(frozen=True)
class CrossLayout(CacheLayout):
    """The cross-attention states, laid out as the decoder's self-attention caches: keys-last
    ``(1, kv_heads, head_dim, S)``, ``S`` the encoder's length padded to a multiple of 32 (the
    ``context`` here). They are written once, by ``encode`` (no single-column write applies), and
    read as they lie by the cached attention form of ``attention_bc1s``: the score product ``q @ K``
    and ``w @ V^T`` read each state once per step, with no per-head split and the keys on the
    scores' last axis (a one-token query pads nothing). The per-head form over keys stored by
    position ``(1, S, 1, C)`` split every state into heads at every step (a second copy of it) and
    padded its ``(1, S, 1, 1)`` scores 32x: Whisper-base's decode step moved 209.9 MB, 140.6 MB
    this way (ESTIMATE against a 121.3 MB floor, on the code of the time; today's figures are in
    ``passes_catalog/decode.md``)."""

    names: tuple[str, str] = CROSS_NAMES


@dataclass(frozen=True)
class EncoderDecoderLayout:
    """The states of an encoder-decoder program: the decoder's self-attention caches, the
    cross-attention states and the encoder mask."""

    decoder: CacheLayout  #: self-attention K/V (1, kv_heads, head_dim, context), as a causal LM's
    cross: CrossLayout  #: cross-attention K/V (1, kv_heads, head_dim, S); S = the encoder length padded to 32
    encoder_length: int  #: the encoder's own output length (S without its padding)
    hidden_size: int  #: channels of the encoder output
    source: SourceSpec
    vocab_size: int

    @property
    def context(self) -> int:
        return self.decoder.context

    @property
    def cross_length(self) -> int:
        return self.cross.context

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return (1, 1, 1, self.cross_length)

    @property
    def state_names(self) -> list[str]:
        return [*self.decoder.state_names, *self.cross.state_names, ENCODER_MASK]

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        return [*self.decoder.state_shapes, *self.cross.state_shapes, self.mask_shape]

    @property
    def states(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.state_names, self.state_shapes, strict=True))

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=self.decoder.dtype) for s in self.state_shapes]

    def state_bytes(self, itemsize: int = 2) -> dict[str, int]:
        """Bytes of the self-attention, cross-attention and mask states (fp16 on Core ML)."""
        return {
            "self": self.decoder.state_bytes(itemsize),
            "cross": self.cross.state_bytes(itemsize),
            "mask": itemsize * self.cross_length,
        }


# -- the caches the model is called with -------------------------------------------------------------


def keys_last_state(x: torch.Tensor, length: int) -> torch.Tensor:
    """Keys or values as a model hands them to its cache, (1, H, T, D), as a keys-last state
    (1, H, D, ``length``), the positions after ``T`` zero."""
    x = x.transpose(2, 3)
    return torch.nn.functional.pad(x, (0, length - x.shape[3]))


def make_cross_cache(layout: CrossLayout, states: list[torch.Tensor] | None):
    """A ``transformers`` cache of cross-attention K/V.

    With ``states`` (``prefill`` / ``decode``) its layers hold the states read as the model's
    ``(1, heads, S, dim)`` keys and values, and report ``S`` cached tokens, so the model reuses them.
    Without (``encode``) it is empty: the model computes K and V of the encoder output and hands them
    to ``update``, which lays them out as states (``cache.new_states``)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    n = len(layout.layers)
    reading = states is not None

    class CrossLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.is_initialized = reading
            if reading:
                self.keys = states[index].transpose(2, 3)  # (1, H, S, D) views of the keys-last states
                self.values = states[n + index].transpose(2, 3)

        def lazy_initialization(self, key_states, value_states):  # pragma: no cover - never lazy
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            if reading:
                raise AnefxError(
                    f"decoder layer {self.index} recomputed its cross-attention keys although they were cached: "
                    "the model does not reuse an EncoderDecoderCache's cross-attention cache"
                )
            cache.new_states[self.index] = keys_last_state(key_states, layout.context)
            cache.new_states[n + self.index] = keys_last_state(value_states, layout.context)
            return key_states, value_states

        def get_seq_length(self) -> int:
            return layout.context if reading else 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return layout.context, 0

        def get_max_length(self) -> int:
            return layout.context

    class CrossCache(Cache):
        def __init__(self):
            super().__init__(layers=[CrossLayer(i) for i in range(n)])
            self.new_states: list[torch.Tensor | None] = [None] * (2 * n)

    cache = CrossCache()
    return cache


def _encoder_decoder_cache(self_cache, cross_cache):
    from transformers.cache_utils import EncoderDecoderCache

    return EncoderDecoderCache(self_cache, cross_cache)


def call_decoder(model, input_ids, encoder_hidden_states, encoder_mask, cache) -> torch.Tensor:
    """The call convention of encoder-decoder generation with the encoder already run; the logits."""
    from transformers.modeling_outputs import BaseModelOutput

    out = model(
        decoder_input_ids=input_ids,
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
        attention_mask=encoder_mask,
        past_key_values=cache,
        use_cache=True,
    )
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise AnefxError(f"the model returned {type(out).__name__} without logits")
    return logits


def run_encoder(model, source: SourceSpec, inputs: torch.Tensor, attention_mask: torch.Tensor | None):
    """The model's encoder on its main input; its last hidden state (1, S, hidden)."""
    encoder = model.get_encoder()
    kwargs = {source.name: inputs}
    if source.takes_mask:
        kwargs["attention_mask"] = attention_mask
    out = encoder(**kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)):
        hidden = out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != 1:
        raise AnefxError(f"the encoder returned {type(out).__name__}; expected a (1, S, hidden) last hidden state")
    return hidden


# -- the view: what anefx changes in the stock code --------------------------------------------------


class _Holder:
    """What the adapted modules read at call time that the model does not pass them (the encoder mask)."""

    encoder_mask: torch.Tensor | None = None


class _View:
    """A shallow copy of a model in which some modules are adapted: the modules on the path to an
    adapted one are copied (their own submodule dicts), every other module, parameter and buffer is
    the model's own (shared, under the same names)."""

    def __init__(self, model: torch.nn.Module):
        self.root = self._copy(model)
        self._copied = {id(self.root)}

    @staticmethod
    def _copy(module: torch.nn.Module) -> torch.nn.Module:
        out = copy.copy(module)
        out._modules = dict(module._modules)
        return out

    def adapt(self, path: str, wrap) -> None:
        """The module at ``path`` calls ``wrap(arguments)`` (its bound arguments, editable) before its
        class's forward."""
        node = self.root
        for name in path.split("."):
            child = node._modules[name]
            if id(child) not in self._copied:
                child = self._copy(child)
                self._copied.add(id(child))
                node._modules[name] = child
            node = child
        original = type(node).forward
        signature = inspect.signature(original)

        def forward(module, *args, **kwargs):
            bound = signature.bind(module, *args, **kwargs)
            wrap(bound.arguments)
            return original(*bound.args, **bound.kwargs)

        node.forward = types.MethodType(forward, node)


class PositionBias(torch.nn.Module):
    """A relative position bias tabulated once with the model's own ``compute_bias``.

    Decoder (``causal``): ``weight[h·context + k, q]`` is the bias of head ``h`` for a query at
    position ``q`` and a key at slot ``k``; a chunk's bias ``(1, H, T, context)`` is the one-hot of its
    positions times the table (a 1x1 convolution in (B, C, 1, S) form). Encoder: the whole
    ``(1, H, S, S)`` bias, a constant."""

    def __init__(self, table: torch.Tensor, causal: bool):
        super().__init__()
        _, heads, rows, keys = table.shape
        self.heads, self.keys, self.causal = heads, keys, causal
        weight = table[0].permute(0, 2, 1).reshape(heads * keys, rows) if causal else table
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, offset, tokens: int) -> torch.Tensor:
        if not self.causal:
            return self.weight
        slots = torch.arange(self.weight.shape[1], dtype=torch.int64)
        positions = torch.arange(tokens, dtype=torch.int64) + offset
        one_hot = (positions.unsqueeze(-1) == slots).to(self.weight.dtype)
        rows = torch.nn.functional.linear(one_hot, self.weight)  # (T, H·K)
        return rows.reshape(tokens, self.heads, self.keys).transpose(0, 1).unsqueeze(0)


def _relative_bias_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "relative_attention_bias", None), torch.nn.Module)
        and callable(getattr(m, "compute_bias", None))
    ]


def _path_of(model, target) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise AnefxError(f"{type(target).__name__} is not a submodule of the model")


def _decoder_layers(model, n: int) -> tuple[str, torch.nn.ModuleList]:
    """The decoder's list of ``n`` layers (``layers``, ``block`` …) and its path in the model."""
    decoder = model.get_decoder()
    base = _path_of(model, decoder)
    for name, child in decoder.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return (f"{base}.{name}" if base else name), child
    raise AnefxError(f"the decoder {type(decoder).__name__} has no list of its {n} layers")


def layer_stacks(model, decoder_layers: int) -> tuple[str, int, str]:
    """The encoder's and the decoder's lists of layers: ``(encoder path, encoder layers, decoder
    path)``, paths in the model (what chunking numbers stages by: the encoder's layers first)."""
    encoder = model.get_encoder()
    base = _path_of(model, encoder)
    lists = [(name, child) for name, child in encoder.named_children() if isinstance(child, torch.nn.ModuleList)]
    if not lists:
        raise AnefxError(f"the encoder {type(encoder).__name__} has no list of layers")
    name, layers = max(lists, key=lambda item: len(item[1]))
    decoder_path, _ = _decoder_layers(model, decoder_layers)
    return (f"{base}.{name}" if base else name), len(layers), decoder_path


class Adapted(torch.nn.Module):
    """The model's view with its adaptations, and the tables they read (buffers of this module)."""

    def __init__(self, model: torch.nn.Module, layout: EncoderDecoderLayout):
        super().__init__()
        self.holder = _Holder()
        view = _View(model)
        self.tables = torch.nn.ModuleDict()
        for k, (path, module) in enumerate(_relative_bias_modules(model)):
            causal = bool(getattr(module, "is_decoder", False))
            if causal:
                length = layout.context
            elif layout.source.is_tokens:
                length = layout.source.shape[-1]
            else:
                length = layout.encoder_length
            with torch.no_grad():
                table = module.compute_bias(length, length)
            self.tables[str(k)] = PositionBias(table, causal)
            view.adapt(path, self._bias_wrapper(str(k), module))
        path, layers = _decoder_layers(model, len(layout.decoder.layers))
        for i, layer in enumerate(layers):
            if "encoder_attention_mask" in inspect.signature(type(layer).forward).parameters:
                view.adapt(f"{path}.{i}", self._mask_wrapper())
        self.model = view.root

    def _bias_wrapper(self, key: str, module):
        layer_idx = getattr(module, "layer_idx", None)

        def wrap(arguments):
            if arguments.get("position_bias") is not None:
                return
            table = self.tables[key]
            tokens = arguments["hidden_states"].shape[1]
            cache = arguments.get("past_key_values")
            offset = cache.get_seq_length(layer_idx) if (table.causal and cache is not None) else 0
            arguments["position_bias"] = table(offset, tokens)

        return wrap

    def _mask_wrapper(self):
        def wrap(arguments):
            mask = self.holder.encoder_mask
            if arguments.get("encoder_attention_mask") is None and arguments.get("encoder_hidden_states") is not None:
                arguments["encoder_attention_mask"] = mask

        return wrap


# -- the step functions --------------------------------------------------------------------------------


class EncodeFunction(torch.nn.Module):
    """``encode``: ``(inputs[, attention_mask]) -> (encoder_length, *cross states, encoder_mask)``;
    ``encoder_length`` (1,) int32 counts the encoder positions kept."""

    def __init__(self, adapted: Adapted, layout: EncoderDecoderLayout):
        super().__init__()
        self.adapted = adapted
        self.layout = layout

    def forward(self, inputs, attention_mask=None):
        layout = self.layout
        model = self.adapted.model
        hidden = run_encoder(model, layout.source, inputs, attention_mask)
        length = hidden.shape[1]
        if length != layout.encoder_length:
            raise AnefxError(f"the encoder returned {length} positions; compiled for {layout.encoder_length}")
        keep = torch.ones(1, length, dtype=hidden.dtype) if attention_mask is None else attention_mask.to(hidden.dtype)
        own = encoder_bias(keep)
        cross = make_cross_cache(layout.cross, None)
        start = torch.zeros(1, 1, dtype=torch.int64)
        cache = _encoder_decoder_cache(make_cache(layout.decoder, layout.decoder.zeros(), start), cross)
        self.adapted.holder.encoder_mask = own
        try:  # one decoder step, so that its own code projects the encoder output: only K and V are kept
            call_decoder(model, start, hidden, own, cache)
        finally:
            self.adapted.holder.encoder_mask = None
        missing = [layout.cross.state_names[i] for i, s in enumerate(cross.new_states) if s is None]
        if missing:
            raise AnefxError(f"the decoder never computed the cross-attention keys and values {missing}")
        kept = keep.sum(-1).to(torch.int32)  # (1,): the encoder positions kept (a function needs an output)
        return (kept, *cross.new_states, encoder_bias(keep, layout.cross_length))


class DecoderStep(torch.nn.Module):
    """``prefill`` / ``decode``: ``(input_ids, position_ids, *self states, *cross states, encoder_mask)
    -> (logits, *self states')``. As for causal LMs, the states are ordinary inputs here, so every pass
    is validated on random states."""

    def __init__(self, adapted: Adapted, layout: EncoderDecoderLayout, last_only: bool = False):
        super().__init__()
        self.adapted = adapted
        self.layout = layout
        self.last_only = last_only  #: a prefill: the logits of the chunk's last position only

    def forward(self, input_ids, position_ids, *states):
        layout = self.layout
        n_self, n_cross = len(layout.decoder.state_names), len(layout.cross.state_names)
        if len(states) != n_self + n_cross + 1:
            raise AnefxError(f"the decoder step takes {n_self + n_cross + 1} states, got {len(states)}")
        self_cache = make_cache(layout.decoder, list(states[:n_self]), position_ids)
        cross = make_cross_cache(layout.cross, list(states[n_self : n_self + n_cross]))
        cache = _encoder_decoder_cache(self_cache, cross)
        bias = states[-1]
        placeholder = torch.zeros(1, layout.cross_length, layout.hidden_size, dtype=layout.decoder.dtype)
        self.adapted.holder.encoder_mask = bias
        try:
            logits = call_decoder(self.adapted.model, input_ids, placeholder, bias, cache)
        finally:
            self.adapted.holder.encoder_mask = None
        missing = [layout.decoder.state_names[i] for i, s in enumerate(self_cache.new_states) if s is None]
        if missing:
            raise AnefxError(f"the model never updated the caches {missing}")
        return (logits[:, -1:] if self.last_only else logits, *self_cache.new_states)

    def prefill(self) -> DecoderStep:
        """This step returning the logits of its chunk's last position only (the same parameters)."""
        return DecoderStep(self.adapted, self.layout, last_only=True)


# -- probing the model ---------------------------------------------------------------------------------


def source_spec(model, source_length: int | None, source_shape: tuple[int, ...] | None) -> SourceSpec:
    """The encoder's main input at its compiled shape: token ids of ``source_length`` (rounded up to
    32) with a mask for text models; features of ``source_shape`` (default for speech models:
    ``num_mel_bins`` x the frames the encoder requires) otherwise."""
    name = getattr(model, "main_input_name", "input_ids")
    config = getattr(model, "config", None)
    if name == "input_ids":
        if source_length is None:
            raise AnefxError("an encoder-decoder text model needs source_length (the padded source tokens)")
        return SourceSpec(name, (1, round_up(int(source_length))), torch.int32, True)
    if source_shape is None:
        mels = getattr(config, "num_mel_bins", None)
        positions = getattr(config, "max_source_positions", None)
        if mels is None or positions is None:
            raise AnefxError(f"the encoder takes {name!r}: pass source_shape, the shape of one input without batch")
        strides = 1
        for m in model.get_encoder().modules():
            if isinstance(m, torch.nn.Conv1d):
                strides *= m.stride[0]
        source_shape = (int(mels), int(positions) * strides)
    return SourceSpec(name, (1, *source_shape), torch.float32, False)


def _layers(shapes: dict, what: str) -> tuple[LayerCache, ...]:
    if sorted(shapes) != list(range(len(shapes))):
        raise AnefxError(f"the model updated its {what} cache of layers {sorted(shapes)}; expected 0..n-1")
    out = []
    for i in range(len(shapes)):
        (b, h, _, dk), (_, hv, _, dv) = shapes[i]
        if b != 1 or hv != h:
            raise AnefxError(f"layer {i} cached {what} keys {shapes[i][0]} and values {shapes[i][1]}: unsupported")
        out.append(LayerCache(h, dk, dv))
    return tuple(out)


def probe_encoder_decoder(
    model: torch.nn.Module,
    context: int,
    *,
    source_length: int | None = None,
    source_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> EncoderDecoderLayout:
    """Every cache's shapes from one eager call of the encoder and one decoder step with recording
    caches; the vocabulary size from its logits."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise AnefxError(f"{type(model).__name__} is not an encoder-decoder model (config.is_encoder_decoder)")
    source = source_spec(model, source_length, source_shape)
    example = torch.zeros(source.shape, dtype=torch.int64 if source.is_tokens else dtype)
    mask = torch.ones(source.shape, dtype=torch.int64) if source.takes_mask else None
    self_probe, cross_probe = _ProbeCache(), _ProbeCache()
    with torch.no_grad():
        hidden = run_encoder(model, source, example, mask)
        ids = torch.zeros(1, 1, dtype=torch.int64)
        logits = call_decoder(model, ids, hidden, mask, _encoder_decoder_cache(self_probe, cross_probe))
    if not self_probe.shapes or not cross_probe.shapes:
        raise AnefxError(
            "the decoder did not cache its self- and cross-attention keys in the EncoderDecoderCache it was given: "
            "compile_lm needs a transformers encoder-decoder model (or one with the same call convention)"
        )
    encoder_length = int(hidden.shape[1])
    return EncoderDecoderLayout(
        decoder=CacheLayout(_layers(self_probe.shapes, "self-attention"), round_up(context), dtype),
        cross=CrossLayout(_layers(cross_probe.shapes, "cross-attention"), round_up(encoder_length), dtype, CROSS_NAMES),
        encoder_length=encoder_length,
        hidden_size=int(hidden.shape[2]),
        source=source,
        vocab_size=int(logits.shape[-1]),
    )


def step_functions(model: torch.nn.Module, layout: EncoderDecoderLayout) -> tuple[EncodeFunction, DecoderStep]:
    """``encode`` and the decoder step (every position's logits) over one adapted view of ``model``:
    both hold the same parameters (``prefill`` is the step with ``last_only``, :meth:`DecoderStep.prefill`)."""
    adapted = Adapted(model, layout)
    return EncodeFunction(adapted, layout), DecoderStep(adapted, layout)
