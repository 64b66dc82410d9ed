"""``compile_lm``: the front end for causal LMs — two step functions and a KV cache as states.

1. The cache layout is probed with one eager call (:func:`~anefx.lm.cache.probe_layout`).
2. The model wrapped as a pure step function (:class:`~anefx.lm.cache.StepFunction`,
   ``(input_ids, position_ids, *states) -> (logits, *states')``) is asked of the stages twice:
   ``prefill`` at ``prefill_length`` tokens and ``decode`` at one token, the caches as the program's
   states (one per layer for K and one for V). Capture, the pipeline with per-pass validation on
   random caches and positions, the guard, the validated hand-off, conversion (both functions in one
   package sharing weights, the caches as Core ML states), chunking and compression are the stages'
   work, the same as for ``compile``.
3. End to end: greedy tokens of :meth:`CompiledLM.generate` (the rewritten graphs, stateful, in
   PyTorch) must equal the original model's ``generate(do_sample=False)`` on a fixed prompt; the worst
   per-step logit error is recorded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from anefx.core.options import CompileOptions, compile_options, prepare
from anefx.core.result import CompiledSteps
from anefx.core.stages import FunctionSpec, ProgramRequest, build
from anefx.driver.events import Event, Events
from anefx.ir.capture import eval_mode
from anefx.ir.errors import AnefxError, ConversionError
from anefx.lm.cache import (
    CacheLayout,
    StepFunction,
    depth_scaled_check,
    probe_layout,
    round_up,
    scaled_tolerances,
    takes_negative_positions,
)
from anefx.lm.generate import (
    MIN_AGREEMENT,
    EndToEndCheck,
    Generation,
    GenerationMismatch,
    Sampling,
    argmax,
    default_prompts,
    end_to_end_check,
    eos_ids,
    greedy,
    next_token_scores,
    prompt_ids,
    teacher_forced,
)
from anefx.lm.seq2seq import CompiledEncoderDecoder, compile_encoder_decoder
from anefx.targets.handoff import StateSpec
from anefx.targets.quality import LMQuality, lm_quality

FUNCTIONS = ("prefill", "decode")

#: What each input and output of both functions means (also written into the package metadata).
INPUTS_DOC = {
    "input_ids": "int32 (1, T): token ids of this chunk (T = prefill_length for prefill, 1 for decode); "
    "pad a short last chunk with any id",
    "position_ids": "int32 (1, T): positions of the chunk's tokens, consecutive from the number of tokens "
    "already in the cache; padding before a prompt takes negative positions (never written nor attended to)",
    "logits": "float (1, 1, vocab): next-token logits of the chunk's last token",
}

__all__ = ["CompiledLM", "EndToEndCheck", "Generation", "GenerationMismatch", "compile_lm"]


@dataclass
class CompiledLM(CompiledSteps):
    """A causal LM compiled for the ANE: ``prefill`` and ``decode`` with the KV cache as state."""

    layout: CacheLayout
    prefill_length: int
    eos_token_ids: list[int]
    vocab_size: int
    check: EndToEndCheck | None = None
    #: the first prefill chunk of a prompt is padded in front with negative positions (False: the
    #: model cannot take them; the tokens after the last full chunk go through ``decode``)
    front_pad: bool = True

    # -- what was built ------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.layout.context

    @property
    def functions(self) -> list[str]:
        return list(FUNCTIONS)

    @property
    def states(self) -> dict[str, tuple[int, ...]]:
        """Core ML state names and shapes (fp16 in the package)."""
        return self.layout.states

    def ane_report(self, function: str):
        """The ANE readiness report (rules, fp16 range, roofline ESTIMATE per chip, memory traffic
        against its floor) of one function; :meth:`context_growth` adds the share that grows with the
        context."""
        self.op_histogram(function)  # same errors for unknown functions / no package
        return self.analyse(function)

    def context_growth(self, other: CompiledLM, function: str = "decode"):
        """How ``function``'s traffic grows with the context: this compile against ``other``, the same
        model compiled at another ``context_length`` (ESTIMATE, :func:`anefx.ane.traffic.context_growth`)."""
        from anefx.ane.traffic import context_growth

        (a, ca), (b, cb) = sorted(((self, self.context_length), (other, other.context_length)), key=lambda x: x[1])
        return context_growth(a.traffic(function), ca, b.traffic(function), cb)

    def weight_bytes(self) -> int:
        """Bytes of the weight files (stored once for both functions), over every package of a chain."""
        return self._converted().weight_bytes()

    def save(self, path) -> Path:
        """Write the ``.mlpackage`` (both functions, shared weights, states, metadata) atomically; a
        chunked compile writes a folder of packages and ``manifest.json``."""
        return super().save(path)

    def with_compression(
        self, compression, *, prompts=None, new_tokens: int = 64, progress: Callable[[Event], None] | None = None
    ) -> CompiledLM:
        """This compile with ``compression`` applied to its converted fp16 functions (no new capture or
        conversion) and its quality measured: how the benchmark compares schemes side by side."""
        out = self._with_artifact(self._compressed(compression, progress))
        if new_tokens:
            measure(out, prompts, new_tokens)
        return out

    # -- running -------------------------------------------------------------------------------
    def step(self, runtime: str = "torch", variant: str | None = None):
        """One call of ``prefill`` or ``decode`` with the states carried from call to call (fresh
        zeros at first): in PyTorch (``"torch"``: the rewritten graphs, or with ``variant`` the
        converted programs with their ``"fp16"`` or ``"compressed"`` weights), or the package with the
        target's executor (``"target"``: its default one; or a runtime of ``anefx.load`` the target
        lists)."""
        if runtime == "torch":
            states = {name: spec.zeros() for name, spec in self.artifact.states.items()}

            def step(function: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                values = {"input_ids": ids, "position_ids": positions}
                return next_token_scores(self.artifact.call(function, values, states, variant), self.vocab_size)

            return step
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

        def run(function: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            out = program({"input_ids": ids, "position_ids": positions}, function=function, state=state)
            return next_token_scores({k: torch.from_numpy(v) for k, v in out.items()}, self.vocab_size)

        return run

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | list[int] | None = ...,
        runtime: str = "torch",
        on_token: Callable[[int], None] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> Generation:
        """Generation with the rewritten stateful graphs, or with the package: greedy (the default,
        and what the end-to-end check compares), or with ``do_sample`` seeded sampling with
        ``temperature``, ``top_k`` and ``top_p`` as ``transformers`` applies them (``seed``: the same
        seed, the same tokens). ``on_token`` is called with each new token as it is chosen. The stop
        tokens are the model's generation config's EOS ids unless ``eos_token_id`` is given.

        ``runtime="torch"`` runs the graphs in PyTorch (anywhere); ``runtime="target"`` runs the
        package with the target's executor (Core ML: anefx's MIL interpreter, any OS);
        ``runtime="mil"`` / ``"coreml"`` name the executor (``"coreml"``: Core ML itself, macOS; it
        raises :class:`TargetUnavailableError` with the reason elsewhere). The prompt is prefilled
        in chunks of ``prefill_length``; generation stops at an EOS id, after ``max_new_tokens``, or
        when the cache is full (``context_length``, with a warning).
        """
        prompt = prompt_ids(input_ids, self.context_length)
        eos = self.eos_token_ids if eos_token_id is ... else eos_token_id
        eos_set = set([eos] if isinstance(eos, int) else (eos or []))
        step = self.step(runtime)
        pick = Sampling(temperature, top_k, top_p, seed).picker() if do_sample else argmax
        return greedy(
            step,
            prompt,
            max_new_tokens,
            self.prefill_length,
            self.context_length,
            eos_set,
            on_token,
            self.front_pad,
            pick,
        )

    def prefill_logits(self, ids: torch.Tensor, variant: str | None = None, runtime: str = "torch") -> torch.Tensor:
        """Every position's next-token logits of ``ids`` (1, T), teacher forced from an empty cache
        through the artifact. ``runtime="torch"``: the rewritten graphs, or with ``variant`` the
        converted programs with their ``"fp16"`` or ``"compressed"`` weights mapped back into PyTorch;
        another runtime executes the packages (``variant="fp16"``: the packages before compression)."""
        view = self
        if runtime != "torch":
            view = self._with_artifact(self.artifact.fp16()) if variant == "fp16" else self
            variant = None
        ids = [int(t) for t in ids.reshape(-1)]
        return teacher_forced(view.step(runtime, variant), ids, self.prefill_length, self.front_pad)


def _example_inputs(layout: CacheLayout, tokens: int, position: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen, dtype=torch.int64).to(torch.int32)
    positions = torch.arange(position, position + tokens, dtype=torch.int32).unsqueeze(0)
    states = [torch.randn(s, generator=gen, dtype=torch.float64).to(layout.dtype) for s in layout.state_shapes]
    channels = [lc.key_channels for lc in layout.layers] + [lc.value_channels for lc in layout.layers]
    for t, c in zip(states, channels, strict=True):
        t[:, c:] = 0  # padding channels stay zero, as the graphs keep them
    return ids, positions, states


def metadata_for(
    *, name: str, architecture: str, layout: CacheLayout, prefill_length: int, eos_ids: list[int], precision: str
) -> dict[str, str]:
    """User-defined metadata: swift-transformers / exporters keys where they exist, ``anefx.*`` otherwise."""
    return {
        "co.huggingface.exporters.name": name,
        "co.huggingface.exporters.task": "text-generation",
        "co.huggingface.exporters.architecture": architecture,
        "co.huggingface.exporters.framework": "pytorch",
        "co.huggingface.exporters.precision": precision,
        "anefx.functions": ",".join(FUNCTIONS),
        "anefx.context_length": str(layout.context),
        "anefx.prefill_length": str(prefill_length),
        "anefx.eos_token_ids": json.dumps(eos_ids),
        "anefx.states": json.dumps({k: list(v) for k, v in layout.states.items()}),
        "anefx.inputs": json.dumps(INPUTS_DOC),
    }


def request_for(model, layout: CacheLayout, prefill_length: int, vocab: int, metadata) -> ProgramRequest:
    """The program compile_lm asks for: ``prefill`` (the logits of its last position) and ``decode``
    over the same states."""
    names = layout.state_names
    io = {n: n for n in names}
    functions = []
    shapes = (("prefill", prefill_length, 0, 1), ("decode", 1, min(prefill_length, layout.context - 1), 2))
    for fn, tokens, position, seed in shapes:
        ids, positions, states = _example_inputs(layout, tokens, position, vocab, seed)
        functions.append(
            FunctionSpec(
                fn,
                StepFunction(model, layout, last_only=fn == "prefill"),
                (ids, positions, *states),
                input_names=["input_ids", "position_ids", *names],
                output_names=["logits", *names],
                states_in=io,
                states_out=io,
                # references from the captured graph, not the eager model: eager and exported kernels
                # differ in the last bits (SDPA with GQA), which is not a pass's doing
                reference="graph",
                tolerances=scaled_tolerances,
                param_prefix="model.",  # StepFunction.model
            )
        )
    n = len(layout.layers)
    states = {
        name: StateSpec(shape, layout.dtype, layer=i % n)
        for i, (name, shape) in enumerate(zip(names, layout.state_shapes, strict=True))
    }
    return ProgramRequest(functions, states, metadata, default="decode")


def compile_lm(
    model: torch.nn.Module,
    *,
    context_length: int | None = None,
    prefill_length: int | None = None,
    check_prompt=None,
    check_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    name: str | None = None,
    quality_prompts=None,
    quality_tokens: int | None = None,
    source_length: int | None = None,
    source_shape: tuple[int, ...] | None = None,
    check_runtime: str | None = None,
    options: CompileOptions | None = None,
    progress: Callable[[Event], None] | None = None,
    **compile_kwargs,
) -> CompiledLM | CompiledEncoderDecoder:
    """Compile a causal LM (a ``transformers`` ``*ForCausalLM`` or any module called as
    ``model(input_ids=, position_ids=, past_key_values=, use_cache=True)`` returning ``.logits``) into
    ``prefill`` + ``decode`` functions with the KV cache as Core ML state.

    A model whose config says ``is_encoder_decoder`` (Whisper, T5, BART …) becomes ``encode`` +
    ``prefill`` + ``decode`` (:func:`anefx.lm.seq2seq.compile_encoder_decoder`, a
    :class:`~anefx.lm.seq2seq.CompiledEncoderDecoder`): ``check_prompt`` / ``quality_prompts`` are
    then encoder inputs, ``source_length`` (text) or ``source_shape`` (features) the encoder's
    compiled input, and the defaults are ``context_length`` 512 (at most the decoder's positions),
    ``prefill_length`` 4, ``quality_tokens`` 16.

    Args:
        context_length: tokens the cache holds (rounded up to a multiple of 32).
        prefill_length: tokens per prefill call; longer prompts are prefilled in chunks.
        check_prompt: the prompt of the end-to-end check (default: seeded random ids spanning two
            prefill chunks); ``check_tokens`` new tokens are compared (0 skips the check).
        check_runtime: what the end-to-end check runs: by default the fp16 package that ships,
            executed with the target's executor (``"target"``: anefx's MIL interpreter for Core ML,
            coreai-core for Core AI), which must agree with the original model's greedy tokens on
            at least ``MIN_AGREEMENT`` of the steps teacher forced (fp16 may flip a near-tie;
            ``CompiledLM.check`` reports the agreement and the per-step logit error); ``"torch"``
            (the default with ``convert=False``) runs the rewritten graphs, whose greedy tokens must
            equal the model's.
        eos_token_id: stop ids (default: the model's generation config).
        compression: ``"lut4" | "lut6" | "lut8" | "int8"`` or a ``CompressionOptions``: both functions
            carry the same compressed weights (stored once); greedy-token agreement and mean KL against
            the fp16 weights are measured in PyTorch on the shipped weights over ``quality_prompts``
            (default: 4 seeded random 16-token prompts) and ``quality_tokens`` new tokens each
            (``CompiledLM.compression``; 0 skips the measurement).
        max_chunk_mb: split the decoder at layer boundaries into consecutive stateful packages of at
            most this many MB of weights, each holding its layers' KV states (``CompiledLM.chunks``;
            ``save`` writes them and ``manifest.json``).
        lm_head: ``LMHeadOptions``: the projection to the vocabulary of both functions split into
            convs the ANE holds, as in ``compile``.
        options, progress and every keyword of :func:`anefx.compile` (``pipeline``, ``target``,
        ``target_options``, ``convert``, ``validate``, ``validation``, ``never_worse``, ``debug``
        and its switches ``dump_dir=…``): as there, with the same precedence (an explicit keyword >
        ``options`` > the ``ANEFX_*`` environment).
    """
    if not isinstance(model, torch.nn.Module):
        raise AnefxError(f"compile_lm needs an nn.Module causal LM, got {type(model).__name__}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return compile_encoder_decoder(
            model,
            context_length=context_length,
            prefill_length=prefill_length,
            source_length=source_length,
            source_shape=source_shape,
            check_inputs=check_prompt,
            check_tokens=check_tokens,
            eos_token_id=eos_token_id,
            name=name,
            quality_inputs=quality_prompts,
            quality_tokens=16 if quality_tokens is None else quality_tokens,
            check_runtime=check_runtime,
            options=options,
            progress=progress,
            **compile_kwargs,
        )
    if source_length is not None or source_shape is not None:
        raise AnefxError("source_length / source_shape are for encoder-decoder models; this is a causal LM")
    context_length = 512 if context_length is None else context_length
    prefill_length = 64 if prefill_length is None else prefill_length
    quality_tokens = 64 if quality_tokens is None else quality_tokens
    opts = compile_options(options, "compile_lm", **compile_kwargs)
    context = round_up(int(context_length))
    if not 1 <= prefill_length <= context:
        raise AnefxError(f"prefill_length must be in [1, context_length={context}], got {prefill_length}")
    plan = prepare(opts, model.named_parameters(), states=True, functions=len(FUNCTIONS))
    events = Events(progress)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    with events.stage("probe"), eval_mode(model):
        layout, vocab = probe_layout(model, context, dtype)
        front_pad = takes_negative_positions(model)
    plan = depth_scaled_check(plan, opts.artifact_check, len(layout.layers))
    eos = eos_ids(model, eos_token_id)
    model_name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    metadata = metadata_for(
        name=str(model_name),
        architecture=type(model).__name__,
        layout=layout,
        prefill_length=prefill_length,
        eos_ids=eos,
        precision=plan.target.precision,
    )
    request = request_for(model, layout, prefill_length, vocab, metadata)
    compiled = CompiledLM(build(request, plan, events), layout, prefill_length, eos, vocab)
    compiled.front_pad = front_pad
    if check_tokens:
        runtime = check_runtime or (
            "target" if compiled.artifact.converted and compiled.artifact.target.capabilities.executor else "torch"
        )
        checked = compiled._checked_view(runtime)
        with events.stage("check", runtime=runtime):
            compiled.check = end_to_end_check(checked, model, check_prompt, check_tokens, vocab, runtime)
        del checked  # its executor: loaded packages
        check = compiled.check
        if runtime == "torch" and not check.tokens_equal:
            raise GenerationMismatch(
                f"{check}: reference {check.reference}, compiled {check.compiled}. "
                "A pass changed what the model generates; rerun with ANEFX_DUMP_DIR set and compare the reports "
                "of both functions"
            )
        if runtime != "torch" and check.agreement < MIN_AGREEMENT:
            raise GenerationMismatch(
                f"{check}: reference {check.reference}, compiled {check.compiled}; below {MIN_AGREEMENT:.0%} "
                "agreement. The package that would ship generates something else than the model: compare "
                "report.artifact of both functions, and check_runtime='torch' (the rewritten graphs)"
            )
    if compiled.compression is not None and quality_tokens:
        with events.stage("quality"):
            measure(compiled, quality_prompts, quality_tokens)
    compiled.build.timings.update(events.timings())
    compiled.build.timings["total"] = events.total
    return compiled


def measure(compiled: CompiledLM, prompts, new_tokens: int, runtime: str | None = None) -> LMQuality:
    """Greedy-token agreement and mean KL of the compressed package against the fp16 package, both
    executed (``runtime``: by default the target's executor, which runs the ``constexpr`` ops that
    decompress the weights; ``"torch"``: the converted graphs with each package's weights mapped back
    into PyTorch): each prompt is continued greedily by the fp16 package (``new_tokens`` tokens, EOS
    ignored, capped so every sequence fits the context), then the prefill function of both packages
    scores every continuation token teacher forced (:func:`~anefx.targets.quality.lm_quality`)."""
    if runtime is None:
        runtime = "target" if compiled.artifact.target.capabilities.executor else "torch"
    if prompts is None:
        prompts = default_prompts(compiled.vocab_size)
    prompts = [torch.as_tensor(p).long().reshape(1, -1) for p in prompts]
    longest = max(p.shape[1] for p in prompts)
    n = min(new_tokens, compiled.context_length - longest)
    if n < 1:
        raise ConversionError(
            f"the quality prompts ({longest} tokens) leave no room in the {compiled.context_length}-token context"
        )
    fp16 = compiled if runtime == "torch" else compiled._with_artifact(compiled.artifact.fp16())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sequences = [fp16.generate(p, n, eos_token_id=None, runtime=runtime).sequences for p in prompts]

    def logits(variant: str):
        view = fp16 if variant == "fp16" else compiled
        return lambda ids: view.prefill_logits(ids, variant, runtime)

    return compiled.compression.set_lm(lm_quality(logits, prompts, n, sequences))
