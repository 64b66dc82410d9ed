"""``compile_lm`` for encoder-decoder models (Whisper, T5, BART …): three functions, one package.

1. The states are probed with one eager encoder call and one decoder step
   (:func:`~anefx.lm.encoder_decoder.probe_encoder_decoder`).
2. The step functions (:mod:`anefx.lm.encoder_decoder`) are asked of the stages as one program:
   ``encode`` (the encoder's input → the cross-attention states and the encoder mask), ``prefill``
   (``prefill_length`` decoder tokens) and ``decode`` (one token), sharing weights and states.
   Capture, the pipeline with per-pass validation (the states are inputs there: random caches,
   random cross states, stress masks), the never-worse guard and the ANE report per function,
   conversion, compression and chunking are the stages' work, as for ``compile``.
3. Generation: ``encode`` once, the start tokens (the generation config's, Whisper's language /
   task / no-timestamps, or ``decoder_input_ids``; :mod:`anefx.lm.processors`) prefilled, then one
   ``decode`` per token, with the generation config's logits processors before each argmax.
4. End to end: greedy tokens equal to the original model's ``generate(do_sample=False,
   num_beams=1)`` on a fixed input, the worst per-step logit error recorded.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anefx.core.options import CompileOptions, compile_options, prepare
from anefx.core.result import CompiledSteps
from anefx.core.stages import FunctionSpec, ProgramRequest, build
from anefx.driver.events import Event, Events
from anefx.ir.capture import eval_mode
from anefx.ir.errors import AnefxError, ConversionError
from anefx.lm.cache import depth_scaled_check, round_up, scaled_tolerances
from anefx.lm.encoder_decoder import (
    ENCODER_MASK,
    MASKED,
    EncoderDecoderLayout,
    layer_stacks,
    probe_encoder_decoder,
    step_functions,
)
from anefx.lm.generate import (
    MIN_AGREEMENT,
    EndToEndCheck,
    Generation,
    GenerationMismatch,
    eos_ids,
    forced,
    forced_check,
    greedy,
    prefill,
    teacher_forced,
)
from anefx.lm.processors import generation_config, logits_processor, not_followed, start_tokens
from anefx.targets.handoff import StateSpec
from anefx.targets.quality import LMQuality, lm_agreement

FUNCTIONS = ("encode", "prefill", "decode")

#: ``co.huggingface.exporters.task`` of a speech and of a text encoder-decoder (the exporters' names)
TASKS = {"input_features": "automatic-speech-recognition", "input_ids": "text2text-generation"}


def inputs_doc(layout: EncoderDecoderLayout) -> dict[str, dict[str, str]]:
    """What each input and output of each function means (also written into the package metadata)."""
    source = layout.source
    if source.is_tokens:
        encode_in = {
            source.name: f"int32 {source.shape}: the source token ids, right-padded with any id",
            "attention_mask": f"int32 {source.shape}: 1 for a source token, 0 for padding",
        }
    else:
        encode_in = {source.name: f"float {source.shape}: the encoder's input (log-mel features for speech)"}
    step = {
        "input_ids": "int32 (1, T): decoder token ids of this chunk (T = prefill_length for prefill, 1 for "
        "decode); prefill full chunks from the first token, the rest of the start tokens through decode",
        "position_ids": "int32 (1, T): positions of the chunk's tokens, consecutive from the number of decoder "
        "tokens already in the cache",
        "logits": "float (1, 1, vocab) for prefill: next-token logits of the chunk's last token; "
        "(1, 1, vocab) for decode",
    }
    return {
        "encode": {
            **encode_in,
            "encoder_length": "int32 (1,): the encoder positions kept (not masked)",
            "states": "writes the cross-attention states (cross_key_<i>, cross_value_<i>) and encoder_mask "
            f"(0 kept, {MASKED:g} masked); call it once per input, before prefill",
        },
        "prefill": step,
        "decode": step,
    }


@dataclass
class CompiledEncoderDecoder(CompiledSteps):
    """An encoder-decoder model compiled for the ANE: ``encode``, ``prefill`` and ``decode`` sharing
    weights and states (self-attention caches, cross-attention states, the encoder mask)."""

    layout: EncoderDecoderLayout
    prefill_length: int
    eos_token_ids: list[int]
    generation_config: Any  #: a copy of the model's (start tokens, logits processors)
    pad_token_id: int
    check: EndToEndCheck | None = None

    # -- what was built ------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.layout.context

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def functions(self) -> list[str]:
        return list(FUNCTIONS)

    @property
    def states(self) -> dict[str, tuple[int, ...]]:
        """State names and shapes (fp16 in the package): self-attention caches, cross-attention
        states and the encoder mask."""
        return self.layout.states

    def ane_report(self, function: str):
        """The ANE readiness report (rules, fp16 range, roofline ESTIMATE per chip) of one function."""
        self.op_histogram(function)
        return self.analyse(function)

    def weight_bytes(self) -> int:
        return self._converted().weight_bytes()

    def save(self, path) -> Path:
        """Write the ``.mlpackage`` (three functions, shared weights, states, metadata) atomically."""
        return super().save(path)

    def with_compression(
        self, compression, *, inputs=None, new_tokens: int = 16, progress: Callable[[Event], None] | None = None
    ) -> CompiledEncoderDecoder:
        """This compile with ``compression`` applied to its converted fp16 functions and its quality
        measured (greedy-token agreement and mean KL against the fp16 weights)."""
        out = self._with_artifact(self._compressed(compression, progress))
        if new_tokens:
            measure(out, inputs, new_tokens)
        return out

    # -- running -------------------------------------------------------------------------------
    def encoder_inputs(self, inputs, attention_mask=None) -> dict[str, torch.Tensor]:
        """``inputs`` (and its mask) as ``encode`` takes them: source ids right-padded to the compiled
        source length (int32, with the mask), or features of exactly the compiled shape."""
        source = self.layout.source
        x = torch.as_tensor(inputs)
        if x.dim() == len(source.shape) - 1:
            x = x.unsqueeze(0)
        if x.shape[0] != 1:
            raise AnefxError(f"generate takes one input (batch 1), got shape {tuple(x.shape)}")
        if not source.is_tokens:
            if tuple(x.shape) != source.shape:
                raise AnefxError(
                    f"the encoder was compiled for {source.name} of shape {source.shape}, got {tuple(x.shape)} "
                    "(pad or cut the features as the feature extractor does, or compile with source_shape=)"
                )
            return {source.name: x.float()}
        n, length = x.shape[1], source.shape[1]
        if n > length:
            raise AnefxError(f"the source has {n} tokens; compiled for at most {length} (compile with source_length=)")
        keep = torch.ones(1, n, dtype=torch.int32) if attention_mask is None else torch.as_tensor(attention_mask)
        if tuple(keep.reshape(1, -1).shape) != (1, n):
            raise AnefxError(f"attention_mask has shape {tuple(keep.shape)}; expected (1, {n})")
        ids = torch.full((1, length), self.pad_token_id, dtype=torch.int32)
        ids[0, :n] = x[0].to(torch.int32)
        mask = torch.zeros(1, length, dtype=torch.int32)
        mask[0, :n] = keep.reshape(-1).to(torch.int32)
        return {source.name: ids, "attention_mask": mask}

    def _session(self, runtime: str = "torch", variant: str | None = None):
        """``call(function, values) -> outputs`` with the states carried from call to call: the
        rewritten graphs in PyTorch (or with ``variant`` the converted programs with their ``"fp16"`` or
        ``"compressed"`` weights), or the package with the target's executor (``"target"`` or a runtime
        the target lists)."""
        if runtime == "torch":
            states = {name: spec.zeros() for name, spec in self.artifact.states.items()}

            def call(function: str, values: dict) -> dict:
                return self.artifact.call(function, values, states, variant)

            return call
        if runtime not in ("target", *self.artifact.target.capabilities.runtimes):
            raise AnefxError(
                f"unknown runtime {runtime!r}; choose 'torch', 'target' or one of "
                f"{sorted(self.artifact.target.capabilities.runtimes)}"
            )
        executors = self.__dict__.setdefault("_executors", {})  # one load per runtime (weights decompressed once)
        if runtime not in executors:
            executors[runtime] = self.artifact.executor(None if runtime == "target" else runtime)
        program = executors[runtime]
        state = program.make_state(self.artifact.default)

        def run(function: str, values: dict) -> dict:
            out = program(values, function=function, state=state)
            return {k: torch.from_numpy(v) for k, v in out.items()}

        return run

    def _steps(self, call):
        def step(function: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return call(function, {"input_ids": ids, "position_ids": positions})["logits"].float()

        return step

    def generate(
        self,
        inputs,
        *,
        attention_mask=None,
        decoder_input_ids=None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = ...,
        runtime: str = "torch",
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy generation: ``encode`` once, the start tokens prefilled, one ``decode`` per token.

        ``inputs``: the encoder's main input — log-mel features for Whisper (the compiled shape,
        e.g. what ``WhisperFeatureExtractor`` returns), source token ids for text models (with their
        ``attention_mask``; right-padded to the compiled source length here). The start tokens come
        from ``decoder_input_ids`` or the generation config (Whisper: language set or detected, task,
        no-timestamps). ``runtime``: as for causal LMs (``"torch"``, ``"target"``, ``"mil"``,
        ``"coreml"``). Stops at an EOS id, after ``max_new_tokens`` or when the cache is full.
        ``Generation.sequences`` holds the start tokens and the new ones."""
        call = self._session(runtime)
        call("encode", self.encoder_inputs(inputs, attention_mask))
        step = self._steps(call)

        def first_logits(tokens: list[int]) -> torch.Tensor:
            return prefill(step, tokens, self.prefill_length, front_pad=False)

        start = start_tokens(self, decoder_input_ids, first_logits)
        if len(start) >= self.context_length:
            raise AnefxError(f"{len(start)} start tokens do not fit the {self.context_length}-token context")
        eos = self.eos_token_ids if eos_token_id is ... else eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        process = logits_processor(self.generation_config, len(start), max_new_tokens, eos_list)
        return greedy(
            step,
            start,
            max_new_tokens,
            self.prefill_length,
            self.context_length,
            set(eos_list),
            on_token,
            front_pad=False,
            process=process,
        )

    def decoder_logits(self, inputs, attention_mask, tokens: torch.Tensor, variant: str | None = None) -> torch.Tensor:
        """Every position's next-token logits of the decoder ``tokens`` (1, T) after encoding
        ``inputs``, teacher forced chunk by chunk (``variant``: the converted programs with their
        ``"fp16"`` or ``"compressed"`` weights; None: the rewritten graphs)."""
        call = self._session("torch", variant)
        call("encode", self.encoder_inputs(inputs, attention_mask))
        ids = [int(t) for t in tokens.reshape(-1)]
        return teacher_forced(self._steps(call), ids, self.prefill_length, front_pad=False)


# -- the program ---------------------------------------------------------------------------------------


def _random_states(layout: EncoderDecoderLayout, gen: torch.Generator, kept: int) -> list[torch.Tensor]:
    """Random caches and cross states and an encoder mask keeping the first ``kept`` positions."""
    out = [
        torch.randn(shape, generator=gen, dtype=torch.float64).to(cache.dtype)
        for cache in (layout.decoder, layout.cross)
        for shape in cache.state_shapes
    ]
    mask = torch.zeros(layout.mask_shape, dtype=layout.decoder.dtype)
    mask[..., kept:] = MASKED
    out.append(mask)
    return out


def example_source(layout: EncoderDecoderLayout, seed: int, padded: bool = True) -> tuple[torch.Tensor, ...]:
    """A seeded random encoder input at the compiled shape (text: ids with the last quarter padded)."""
    gen = torch.Generator().manual_seed(seed)
    source = layout.source
    if not source.is_tokens:
        return (torch.randn(source.shape, generator=gen),)
    ids = torch.randint(0, layout.vocab_size, source.shape, generator=gen).to(torch.int32)
    mask = torch.ones(source.shape, dtype=torch.int32)
    if padded:
        mask[:, source.shape[1] - max(1, source.shape[1] // 4) :] = 0
    return ids, mask


def request_for(model, layout: EncoderDecoderLayout, prefill_length: int, metadata: dict[str, str]) -> ProgramRequest:
    """The program: ``encode``, ``prefill`` and ``decode`` over the same states."""
    encode, step = step_functions(model, layout)
    names = layout.state_names
    self_names, cross_names = layout.decoder.state_names, layout.cross.state_names
    source = example_source(layout, 0)
    source_names = [layout.source.name, "attention_mask"][: len(source)]
    written = {n: n for n in [*cross_names, ENCODER_MASK]}
    functions = [
        FunctionSpec(
            "encode",
            encode,
            source,
            input_names=source_names,
            output_names=["encoder_length", *written],
            states_out=written,
            reference="graph",
            tolerances=scaled_tolerances,
            param_prefix="adapted.model.",
        )
    ]
    kept = max(1, min(layout.encoder_length, layout.cross_length) * 3 // 4)
    # one set of example states for both decoder functions (a 32-layer model's are 0.6 GB in fp32);
    # each function's validation draws its random sets of its own
    states = _random_states(layout, torch.Generator().manual_seed(3), kept)
    for fn, module, tokens, position, seed in (
        ("prefill", step.prefill(), prefill_length, 0, 1),
        ("decode", step, 1, min(prefill_length, layout.context - 1), 2),
    ):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, layout.vocab_size, (1, tokens), generator=gen, dtype=torch.int64).to(torch.int32)
        positions = torch.arange(position, position + tokens, dtype=torch.int32).unsqueeze(0)
        functions.append(
            FunctionSpec(
                fn,
                module,
                (ids, positions, *states),
                input_names=["input_ids", "position_ids", *names],
                output_names=["logits", *self_names],
                states_in={n: n for n in names},
                states_out={n: n for n in self_names},
                reference="graph",
                tolerances=scaled_tolerances,
                param_prefix="adapted.model.",
            )
        )
    # chunking numbers the encoder's layers first, then the decoder's: a chunk never holds both, so
    # the encoder is a chunk of its own (as WhisperKit ships it); each decoder layer's states live
    # in its chunk, the encoder mask with the first decoder layer
    encoder_path, encoder_layers, decoder_path = layer_stacks(model, len(layout.decoder.layers))
    stage_of = _stage_function(encoder_path, encoder_layers, decoder_path)
    states = {}
    for cache in (layout.decoder, layout.cross):
        n = len(cache.layers)
        for i, (name, shape) in enumerate(zip(cache.state_names, cache.state_shapes, strict=True)):
            states[name] = StateSpec(shape, cache.dtype, layer=encoder_layers + i % n)
    states[ENCODER_MASK] = StateSpec(layout.mask_shape, layout.decoder.dtype, layer=encoder_layers)
    return ProgramRequest(
        functions, states, metadata, default="decode", stage_of=stage_of, stage_breaks=(encoder_layers,)
    )


def _stage_function(encoder_path: str, encoder_layers: int, decoder_path: str):
    """A parameter's stage: encoder layer ``i`` → ``i``, decoder layer ``i`` → encoder layers + ``i``."""
    patterns = [
        (re.compile(rf"(?:^|\.){re.escape(path)}\.(\d+)\."), offset)
        for path, offset in ((encoder_path, 0), (decoder_path, encoder_layers))
    ]

    def stage_of(param: str) -> int | None:
        for pattern, offset in patterns:
            m = pattern.search(param + ".")
            if m:
                return offset + int(m.group(1))
        return None

    return stage_of


def metadata_for(
    *,
    name: str,
    architecture: str,
    layout: EncoderDecoderLayout,
    prefill_length: int,
    eos: list[int],
    start: list[int] | None,
    precision: str,
) -> dict[str, str]:
    """User-defined metadata: swift-transformers / exporters keys where they exist, ``anefx.*`` otherwise."""
    return {
        "co.huggingface.exporters.name": name,
        "co.huggingface.exporters.task": TASKS.get(layout.source.name, "text2text-generation"),
        "co.huggingface.exporters.architecture": architecture,
        "co.huggingface.exporters.framework": "pytorch",
        "co.huggingface.exporters.precision": precision,
        "anefx.functions": ",".join(FUNCTIONS),
        "anefx.context_length": str(layout.context),
        "anefx.prefill_length": str(prefill_length),
        "anefx.encoder_length": str(layout.encoder_length),
        "anefx.source_shape": json.dumps(list(layout.source.shape)),
        "anefx.eos_token_ids": json.dumps(eos),
        "anefx.decoder_start_token_ids": json.dumps(start),
        "anefx.states": json.dumps({k: list(v) for k, v in layout.states.items()}),
        "anefx.inputs": json.dumps(inputs_doc(layout)),
    }


def _default_start(model) -> list[int] | None:
    """The start tokens when they do not depend on the input (None: Whisper's detected language)."""
    try:
        return start_tokens(model)
    except AnefxError:
        return None


def _context(model, context_length: int | None) -> int:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_target_positions", None)
    if limit is None and not hasattr(config, "relative_attention_num_buckets"):
        limit = getattr(config, "max_position_embeddings", None)
    if context_length is None:
        context = 512 if limit is None else min(512, limit // 32 * 32 or limit)
    else:
        context = round_up(int(context_length))
    if limit is not None and context > limit:
        raise AnefxError(
            f"context_length {context} is above the decoder's {limit} positions ({type(model).__name__}); "
            f"compile with context_length <= {limit}"
        )
    return context


def compile_encoder_decoder(
    model: torch.nn.Module,
    *,
    context_length: int | None = None,
    prefill_length: int | None = None,
    source_length: int | None = None,
    source_shape: tuple[int, ...] | None = None,
    check_inputs=None,
    check_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    name: str | None = None,
    quality_inputs=None,
    quality_tokens: int = 16,
    check_runtime: str | None = None,
    options: CompileOptions | None = None,
    progress: Callable[[Event], None] | None = None,
    **compile_kwargs,
) -> CompiledEncoderDecoder:
    """``compile_lm`` of a model with ``config.is_encoder_decoder`` (see :func:`anefx.compile_lm`).

    Args:
        context_length: decoder tokens the self-attention caches hold (default 512, at most the
            decoder's positions: 448 for Whisper).
        prefill_length: decoder tokens per prefill call (default 4: Whisper's start tokens).
        source_length: text models: the source tokens the encoder is compiled for (rounded up to 32;
            shorter sources are right-padded and masked). source_shape: models whose encoder takes
            features: one input's shape without batch (default from the config: Whisper's mel bins x
            2 · max_source_positions frames).
        check_inputs: the encoder input of the end-to-end check (default: seeded random, padded for
            text), ``check_tokens`` new tokens compared (0 skips the check); for text models a tuple
            ``(ids, attention_mask)`` or the ids.
        check_runtime: what the end-to-end check runs, as for causal LMs: by default the fp16
            package that ships, executed with the target's executor, whose teacher-forced greedy
            tokens must agree with the model's on at least ``MIN_AGREEMENT`` of the steps;
            ``"torch"`` (the default with ``convert=False``) the rewritten graphs, whose greedy
            tokens must equal the model's.
        quality_inputs / quality_tokens: the inputs and new tokens of the compression quality
            measurement (default 2 seeded random inputs; 0 skips it).
        the rest: as :func:`anefx.compile_lm`.
    """
    opts = compile_options(options, "compile_lm", **compile_kwargs)
    context = _context(model, context_length)
    prefill_length = 4 if prefill_length is None else int(prefill_length)
    if not 1 <= prefill_length <= context:
        raise AnefxError(f"prefill_length must be in [1, context_length={context}], got {prefill_length}")
    plan = prepare(opts, model.named_parameters(), states=True, functions=len(FUNCTIONS))
    events = Events(progress)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    with events.stage("probe"), eval_mode(model):
        layout = probe_encoder_decoder(
            model, context, source_length=source_length, source_shape=source_shape, dtype=dtype
        )
    _, encoder_layers, _ = layer_stacks(model, len(layout.decoder.layers))
    plan = depth_scaled_check(plan, opts.artifact_check, max(encoder_layers, len(layout.decoder.layers)))
    ignored = not_followed(generation_config(model))
    if ignored:
        warnings.warn(
            f"the generation config sets {sorted(ignored)}, which anefx's greedy generation does not follow; "
            "the end-to-end check turns them off in the reference too",
            stacklevel=3,
        )
    eos = eos_ids(model, eos_token_id)
    model_name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    metadata = metadata_for(
        name=str(model_name),
        architecture=type(model).__name__,
        layout=layout,
        prefill_length=prefill_length,
        eos=eos,
        start=_default_start(model),
        precision=plan.target.precision,
    )
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    with eval_mode(model):
        request = request_for(model, layout, prefill_length, metadata)
        built = build(request, plan, events)
    compiled = CompiledEncoderDecoder(
        built,
        layout,
        prefill_length,
        eos,
        copy.deepcopy(generation_config(model)),
        int(pad) if pad is not None else 0,
    )
    if check_tokens:
        runtime = check_runtime or (
            "target" if compiled.artifact.converted and compiled.artifact.target.capabilities.executor else "torch"
        )
        checked = compiled._checked_view(runtime)
        with events.stage("check", runtime=runtime):
            compiled.check = end_to_end_check(checked, model, check_inputs, check_tokens, ignored, runtime)
        del checked  # its executor: loaded packages
        check = compiled.check
        if runtime == "torch" and not check.tokens_equal:
            raise GenerationMismatch(
                f"{check}: reference {check.reference}, compiled {check.compiled}. "
                "A pass changed what the model generates; rerun with ANEFX_DUMP_DIR set and compare the reports "
                "of the three functions"
            )
        if runtime != "torch" and check.agreement < MIN_AGREEMENT:
            raise GenerationMismatch(
                f"{check}: reference {check.reference}, compiled {check.compiled}; below {MIN_AGREEMENT:.0%} "
                "agreement. The package that would ship generates something else than the model: compare "
                "report.artifact of the three functions, and check_runtime='torch' (the rewritten graphs)"
            )
    if compiled.compression is not None and quality_tokens:
        with events.stage("quality"):
            measure(compiled, quality_inputs, quality_tokens)
    compiled.build.timings.update(events.timings())
    compiled.build.timings["total"] = events.total
    return compiled


# -- checks ---------------------------------------------------------------------------------------------


def _split_inputs(layout: EncoderDecoderLayout, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, (tuple, list)):
        return torch.as_tensor(inputs[0]), (torch.as_tensor(inputs[1]) if len(inputs) > 1 else None)
    return torch.as_tensor(inputs), None


def _check_source(layout: EncoderDecoderLayout, seed: int):
    """A default input of the checks: features, or a source with its padding cut off (what a user
    passes to generate)."""
    source = example_source(layout, seed)
    if len(source) == 1:
        return source[0], None
    ids, mask = source
    n = int(mask.sum())
    return ids[:, :n].long(), torch.ones(1, n, dtype=torch.long)


def reference_generate(model, inputs, mask, start: list[int], n: int, eos: list[int], ignored: dict):
    """The original model's greedy tokens and per-step logits: ``generate(do_sample=False,
    num_beams=1)`` from the same start tokens, with the not-followed processors turned off."""
    off = {k: None for k in ignored}
    kwargs = {"attention_mask": mask.long()} if mask is not None else {}
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            inputs.long() if not inputs.dtype.is_floating_point else inputs,
            **kwargs,
            decoder_input_ids=torch.tensor([start]),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=eos or None,
            temperature=None,
            top_p=None,
            top_k=None,
            **off,
        )
    steps = len(out.logits)
    return [int(t) for t in out.sequences[0, -steps:]], [lg[0].float() for lg in out.logits]


def end_to_end_check(
    compiled: CompiledEncoderDecoder, model, inputs, new_tokens: int, ignored: dict, runtime: str = "torch"
) -> EndToEndCheck:
    """The compiled generator (``runtime``: the rewritten graphs, or the package with the target's
    executor) against the original model's greedy tokens: its own tokens, and teacher forced (the
    reference tokens fed back after the same start tokens) the agreement of its choices, after the
    generation config's processors, and the per-step logit error (see :class:`EndToEndCheck`)."""
    layout = compiled.layout
    x, mask = _check_source(layout, 1234) if inputs is None else _split_inputs(layout, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled.generate(x, attention_mask=mask, max_new_tokens=new_tokens, runtime=runtime)
        start = out.sequences[0, : out.sequences.shape[1] - len(out.new_tokens)].tolist()
        ref_tokens, ref_logits = reference_generate(model, x, mask, start, new_tokens, compiled.eos_token_ids, ignored)
        call = compiled._session(runtime)
        call("encode", compiled.encoder_inputs(x, mask))
        fed = forced(compiled._steps(call), start, ref_tokens, compiled.prefill_length, front_pad=False)
    process = logits_processor(compiled.generation_config, len(start), new_tokens, compiled.eos_token_ids)
    return forced_check(start, out, ref_tokens, ref_logits, fed, runtime, process)


def measure(compiled: CompiledEncoderDecoder, inputs, new_tokens: int) -> LMQuality:
    """Greedy-token agreement and mean KL of the compressed weights against the fp16 weights, on the
    shipped weights: each input is continued greedily by the compiled generator (``new_tokens``, EOS
    ignored), then the converted programs with the fp16 and with the compressed weights score every
    continuation token teacher forced (:func:`~anefx.targets.quality.lm_agreement`)."""
    layout = compiled.layout
    if inputs is None:
        inputs = [_check_source(layout, seed) for seed in (4321, 4322)]
    else:
        inputs = [_split_inputs(layout, i) for i in inputs]
    n = min(new_tokens, compiled.context_length - compiled.prefill_length)
    if n < 1:
        raise ConversionError(f"the {compiled.context_length}-token context leaves no room for the quality tokens")
    results = []
    for x, mask in inputs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled.generate(x, attention_mask=mask, max_new_tokens=n, eos_token_id=None)
        prompt = out.sequences.shape[1] - len(out.new_tokens)

        def logits(variant: str, x=x, mask=mask):
            return lambda ids: compiled.decoder_logits(x, mask, ids, variant)

        results.append(lm_agreement(logits("fp16"), logits("compressed"), [out.sequences], [prompt]))
    tokens = sum(q.tokens for q in results)
    quality = LMQuality(
        agreement=sum(q.agreement * q.tokens for q in results) / tokens,
        mean_kl=sum(q.mean_kl * q.tokens for q in results) / tokens,
        max_kl=max(q.max_kl for q in results),
        tokens=tokens,
        prompts=len(results),
        first_disagreement=[f for q in results for f in q.first_disagreement],
    )
    return compiled.compression.set_lm(quality)
