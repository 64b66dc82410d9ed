"""``compile_lm``: a causal LM → validated ``prefill`` + ``decode`` graphs → one stateful ``.mlpackage``.

1. The cache layout is probed with one eager call (:func:`~anefx.lm.cache.probe_layout`).
2. The model wrapped as a pure step function (:class:`~anefx.lm.cache.StepFunction`) is captured twice,
   at ``prefill_length`` tokens and at one token, and each capture runs through the anefx pipeline with
   its per-pass validation (random caches and positions: the states are inputs there).
3. Each function is converted with the cache as Core ML states and both are merged into one package.
4. End to end: greedy tokens of :meth:`CompiledLM.generate` (the rewritten graphs, stateful, in
   PyTorch) must equal the original model's ``generate(do_sample=False)`` on a fixed prompt; the worst
   per-step logit error is recorded.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anefx.driver.debug import DebugOptions, validate_mode_from_env
from anefx.driver.pipeline import Pipeline
from anefx.driver.report import Report
from anefx.driver.validate import Tolerance, ValidationOptions
from anefx.ir.capture import capture, eval_mode
from anefx.ir.errors import AnefxError, TargetUnavailableError
from anefx.lm.cache import CacheLayout, StepFunction, probe_layout, round_up
from anefx.lm.package import FUNCTIONS, LMPackage, convert_function, merge, metadata_for
from anefx.lm.stateful import Stateful


class GenerationMismatch(AnefxError):
    """The compiled generator's greedy tokens differ from the original model's."""


@dataclass
class Generation:
    """The result of :meth:`CompiledLM.generate`."""

    sequences: torch.Tensor  #: (1, prompt + new) token ids
    new_tokens: list[int]
    logits: list[torch.Tensor]  #: one (vocab,) tensor per generated token
    stop_reason: str  #: "eos", "max_new_tokens" or "context_length"
    message: str = ""


@dataclass
class EndToEndCheck:
    prompt_tokens: int
    new_tokens: int
    tokens_equal: bool
    max_logit_error: float
    reference: list[int]
    compiled: list[int]

    def __str__(self) -> str:
        verdict = "equal" if self.tokens_equal else "DIFFER"
        return (
            f"greedy tokens {verdict} to the original model's generate() for {self.new_tokens} new tokens from a "
            f"{self.prompt_tokens}-token prompt; worst per-step logit error {self.max_logit_error:.3g}"
        )


@dataclass
class CompiledLM:
    """A causal LM compiled for the ANE: ``prefill`` and ``decode`` with the KV cache as state."""

    layout: CacheLayout
    prefill_length: int
    graphs: dict[str, torch.fx.GraphModule] = field(repr=False)
    reports: dict[str, Report] = field(repr=False)
    package: LMPackage | None = field(repr=False)
    metadata: dict[str, str] = field(repr=False)
    eos_token_ids: list[int]
    check: EndToEndCheck | None = None
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    examples: dict[str, list] = field(default_factory=dict, repr=False)  #: each function's flat example inputs
    #: the weight compression (``compression=``): per function plan and errors, agreement and KL
    compression: Any = None
    #: the converted fp16 functions (what ``with_compression`` compresses again)
    fp16_functions: dict[str, Any] = field(default_factory=dict, repr=False)
    vocab_size: int = 0
    #: the chain of packages when split (``max_chunk_mb=``); ``package`` is then None
    chunks: Any = None

    def __post_init__(self):
        shared = self.layout.zeros()
        if self.chunks is not None:  # generate runs the chain of chunk graphs, each with its states
            states = dict(zip(self.layout.state_names, shared, strict=True))
            self._runners = {name: self.chunks.runner(name, states) for name in FUNCTIONS}
        else:
            self._runners = {name: Stateful(gm, self.layout, shared) for name, gm in self.graphs.items()}

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

    def op_histogram(self, function: str) -> collections.Counter:
        """MIL op types of one function of the converted package (``const`` excluded)."""
        if function not in FUNCTIONS:
            raise KeyError(f"no function {function!r}; this package has {list(FUNCTIONS)}")
        if self.chunks is not None:
            return self.chunks.op_histogram(function)
        if self.package is None:
            raise AttributeError("compiled with convert=False: there is no converted program to inspect")
        return self.package.op_histogram(function)

    def ane_report(self, function: str):
        """The ANE readiness report (rules, fp16 range, roofline ESTIMATE per chip) of one function."""
        from anefx.ane.report import analyse

        self.op_histogram(function)  # same errors for unknown functions / no package
        if self.chunks is not None:
            parts = [(c.package.functions[function], c.graphs[function], f"chunk{c.index}") for c in self.chunks.chunks]
            return analyse(None, self.graphs[function], self.examples[function], parts)
        return analyse(self.package.functions[function], self.graphs[function], self.examples[function])

    def weight_bytes(self) -> int:
        """Bytes of the weight blobs of the package (stored once for both functions); of all the
        packages of a chunked compile."""
        if self.chunks is not None:
            return sum(f.stat().st_size for c in self.chunks.chunks for f in c.package.staged.rglob("*.bin"))
        if self.package is None:
            raise AttributeError("compiled with convert=False: there is no package")
        return sum(f.stat().st_size for f in self.package.staged.rglob("*.bin"))

    def save(self, path) -> Path:
        """Write the ``.mlpackage`` (both functions, shared weights, states, metadata) atomically; a
        chunked compile writes a folder of packages and ``manifest.json``."""
        if self.chunks is not None:
            return self.chunks.save(path)
        if self.package is None:
            raise AttributeError("compiled with convert=False: there is nothing to save")
        return self.package.save(path)

    def with_compression(self, compression, *, prompts=None, new_tokens: int = 64, progress=None) -> CompiledLM:
        """This compile with ``compression`` applied to its converted fp16 functions (no new capture or
        conversion) and its quality measured: how the benchmark compares schemes side by side."""
        import dataclasses

        from anefx.targets.compression import resolve

        comp = resolve(compression)
        if not self.fp16_functions:
            raise AnefxError("with_compression needs the converted functions: compile with convert=True")
        if comp is None:
            raise AnefxError("with_compression needs a scheme ('lut4', 'lut6', 'lut8', 'int8' or CompressionOptions)")
        meta = {**self.metadata, "anefx.compression": comp.scheme}
        package, lm_compression = _compress_and_merge(
            self.fp16_functions, comp, {fn: self.examples[fn][:2] for fn in FUNCTIONS}, meta, progress
        )
        out = dataclasses.replace(self, package=package, compression=lm_compression, metadata=meta)
        if new_tokens:
            _measure(out, prompts, new_tokens, progress)
        return out

    # -- running -------------------------------------------------------------------------------
    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | list[int] | None = ...,
        runtime: str = "torch",
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy generation with the rewritten stateful graphs.

        ``runtime="torch"`` runs them in PyTorch (anywhere); ``runtime="coreml"`` runs the saved package
        with Core ML (macOS only; raises :class:`TargetUnavailableError` with the reason elsewhere).
        The prompt is prefilled in chunks of ``prefill_length``; generation stops at an EOS id, after
        ``max_new_tokens``, or when the cache is full (``context_length``, with a warning).
        """
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise AnefxError(f"generate takes one prompt of shape (1, T) or (T,), got {tuple(ids.shape)}")
        prompt = [int(t) for t in ids[0]]
        if not prompt:
            raise AnefxError("generate needs at least one prompt token")
        if len(prompt) > self.context_length:
            raise AnefxError(
                f"the prompt has {len(prompt)} tokens but the cache holds {self.context_length} "
                "(context_length): compile with a larger context_length or shorten the prompt"
            )
        eos = self.eos_token_ids if eos_token_id is ... else eos_token_id
        eos_set = set([eos] if isinstance(eos, int) else (eos or []))
        step = self._step_fn(runtime)
        logits_out: list[torch.Tensor] = []
        new: list[int] = []
        stop, message = "max_new_tokens", ""
        p = self.prefill_length
        last = None
        for start in range(0, len(prompt), p):
            chunk = prompt[start : start + p]
            n = len(chunk)
            chunk_ids = torch.tensor([chunk + [0] * (p - n)], dtype=torch.int32)
            positions = torch.arange(start, start + p, dtype=torch.int32).unsqueeze(0)
            last = step("prefill", chunk_ids, positions)[0, n - 1]
        pos = len(prompt)
        while len(new) < max_new_tokens:
            token = int(torch.argmax(last))
            logits_out.append(last.float())
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos_set:
                stop = "eos"
                break
            if len(new) == max_new_tokens:
                break
            if pos >= self.context_length:
                stop = "context_length"
                message = (
                    f"stopped after {len(new)} new tokens: the cache is full ({self.context_length} tokens, "
                    "context_length); compile with a larger context_length for longer generations"
                )
                warnings.warn(message, stacklevel=2)
                break
            last = step("decode", torch.tensor([[token]], dtype=torch.int32), torch.tensor([[pos]], dtype=torch.int32))[
                0, 0
            ]
            pos += 1
        seq = torch.tensor([prompt + new], dtype=torch.long)
        return Generation(seq, new, logits_out, stop, message)

    def _step_fn(self, runtime: str):
        if runtime == "torch":
            for r in self._runners.values():
                r.reset()

            def run(function, ids, positions):
                with torch.no_grad():
                    return self._runners[function](ids, positions)

            return run
        if runtime == "coreml":
            return self._coreml_step()
        raise AnefxError(f"unknown runtime {runtime!r}; choose 'torch' or 'coreml'")

    def _coreml_step(self):
        from anefx.targets.coreml import coremltools_module, runtime_available

        ok, why = runtime_available()
        if not ok:
            raise TargetUnavailableError(f"runtime='coreml' cannot run here: {why}")
        if self.package is None:
            raise AttributeError("compiled with convert=False or chunked: there is no single package to run")
        ct = coremltools_module()
        path = str(self.package.staged)
        models = {f: ct.models.MLModel(path, function_name=f) for f in FUNCTIONS}
        state = models["decode"].make_state()

        def run(function, ids, positions):
            out = models[function].predict(
                {"input_ids": ids.numpy(), "position_ids": positions.numpy()}, state=state
            )  # pragma: no cover - macOS only
            return torch.from_numpy(out["logits"]).float()

        return run


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


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, "eos_token_id", None)
        if value is not None:
            return [value] if isinstance(value, int) else list(value)
    return []


def _reference_generate(model, prompt: torch.Tensor, n: int, eos: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """The original model's greedy tokens and per-step logits (``generate(do_sample=False)`` when it
    has one, else a plain loop recomputing the whole sequence)."""
    with eval_mode(model), torch.no_grad():
        if hasattr(model, "generate"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=n,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    eos_token_id=eos or None,
                    pad_token_id=(eos[0] if eos else 0),
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            tokens = [int(t) for t in out.sequences[0, prompt.shape[1] :]]
            return tokens, [lg[0].float() for lg in out.logits]
        seq = prompt.clone()
        tokens, logits = [], []
        for _ in range(n):
            lg = model(input_ids=seq).logits[0, -1].float()
            tok = int(lg.argmax())
            tokens.append(tok)
            logits.append(lg)
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
            if tok in eos:
                break
        return tokens, logits


def _example_inputs(layout: CacheLayout, tokens: int, position: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen, dtype=torch.int64).to(torch.int32)
    positions = torch.arange(position, position + tokens, dtype=torch.int32).unsqueeze(0)
    states = [torch.randn(s, generator=gen, dtype=torch.float64).to(layout.dtype) for s in layout.state_shapes]
    channels = [lc.key_channels for lc in layout.layers] + [lc.value_channels for lc in layout.layers]
    for t, c in zip(states, channels, strict=True):
        t[:, c:] = 0  # padding channels stay zero, as the graphs keep them
    return ids, positions, states


def compile_lm(
    model: torch.nn.Module,
    *,
    context_length: int = 512,
    prefill_length: int = 64,
    target: str = "coreml",
    target_options: Any = None,
    pipeline: Pipeline | None = None,
    validate: str | None = None,
    validation: ValidationOptions | None = None,
    convert: bool = True,
    check_prompt=None,
    check_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    name: str | None = None,
    debug: DebugOptions | None = None,
    progress: Callable[[str], None] | None = None,
    compression: Any = None,
    max_chunk_mb: float | None = None,
    quality_prompts=None,
    quality_tokens: int = 64,
) -> CompiledLM:
    """Compile a causal LM (a ``transformers`` ``*ForCausalLM`` or any module called as
    ``model(input_ids=, position_ids=, past_key_values=, use_cache=True)`` returning ``.logits``) into
    ``prefill`` + ``decode`` functions with the KV cache as Core ML state.

    Args:
        context_length: tokens the cache holds (rounded up to a multiple of 32).
        prefill_length: tokens per prefill call; longer prompts are prefilled in chunks.
        check_prompt: the prompt of the end-to-end check (default: seeded random ids spanning two
            prefill chunks); ``check_tokens`` new tokens are compared (0 skips the check).
        eos_token_id: stop ids (default: the model's generation config).
        compression: ``"lut4" | "lut6" | "lut8" | "int8"`` or a ``CompressionOptions``: both functions
            carry the same compressed weights (stored once); greedy-token agreement and mean KL against
            the fp16 weights are measured in PyTorch on the shipped weights over ``quality_prompts``
            (default: 4 seeded random 16-token prompts) and ``quality_tokens`` new tokens each
            (``CompiledLM.compression``; 0 skips the measurement).
        max_chunk_mb: split the decoder at layer boundaries into consecutive stateful packages of at
            most this many MB of weights, each holding its layers' KV states (``CompiledLM.chunks``;
            ``save`` writes them and ``manifest.json``).
        Other arguments as in :func:`anefx.compile`.
    """
    if target != "coreml":
        raise AnefxError(
            f"compile_lm supports target='coreml' (Core ML states, iOS18); got {target!r}: the Core AI "
            "hand-off has no state support in anefx yet"
        )
    if not isinstance(model, torch.nn.Module):
        raise AnefxError(f"compile_lm needs an nn.Module causal LM, got {type(model).__name__}")
    context = round_up(int(context_length))
    if not 1 <= prefill_length <= context:
        raise AnefxError(f"prefill_length must be in [1, context_length={context}], got {prefill_length}")
    comp = _check_deploy_options(model, compression, max_chunk_mb, convert)
    timings: dict[str, float] = {}
    say = progress or (lambda _s: None)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)

    t0 = time.perf_counter()
    with eval_mode(model):
        layout, vocab = probe_layout(model, context, dtype)
    step = StepFunction(model, layout)
    timings["probe"] = time.perf_counter() - t0

    pipeline = pipeline if pipeline is not None else Pipeline.default()
    scaled = validation is None
    if validation is not None:
        pipeline = pipeline.with_validation(validation)
    pipeline = pipeline.with_validation(mode=validate or validate_mode_from_env(pipeline.validation.mode))
    debug = debug or DebugOptions.from_env()

    graphs, reports, examples, flat = {}, {}, {}, {}
    shapes = (("prefill", prefill_length, 0, 1), ("decode", 1, min(prefill_length, context - 1), 2))
    for fn, tokens, position, seed in shapes:
        ids, positions, states = _example_inputs(layout, tokens, position, vocab, seed)
        examples[fn] = (ids, positions)
        say(f"capture:{fn}")
        t0 = time.perf_counter()
        captured = capture(step, (ids, positions, *states))
        timings[f"capture:{fn}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn_pipeline = (
            pipeline.with_validation(tolerances=scaled_tolerances(captured, pipeline.validation))
            if scaled
            else pipeline
        )
        # references from the captured graph, not the eager model: eager and exported kernels differ
        # in the last bits (SDPA with GQA), which is not a pass's doing
        result = fn_pipeline.run(
            captured.graph_module,
            captured.flat_inputs,
            reference_outputs=None,
            debug=debug,
            progress=(lambda p, fn=fn: say(f"{fn}:{p}")) if progress else None,
        )
        timings[f"passes:{fn}"] = time.perf_counter() - t0
        graphs[fn] = result.graph_module
        flat[fn] = captured.flat_inputs
        reports[fn] = Report(result.records)

    eos = _eos_ids(model, eos_token_id)
    model_name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    arch = type(model).__name__
    opts = None
    package = None
    if convert:
        from anefx.targets.coreml import CoreMLOptions

        opts = target_options if target_options is not None else CoreMLOptions()
        meta = metadata_for(
            name=str(model_name),
            architecture=arch,
            layout=layout,
            prefill_length=prefill_length,
            eos_ids=eos,
            precision=opts.precision_name,
        )
        if comp is not None:
            meta["anefx.compression"] = comp.scheme
    if convert and max_chunk_mb is not None:
        from anefx.lm.chunks import convert_chunks, split_lm
        from anefx.targets.compression import bytes_per_weight

        say("split")
        t0 = time.perf_counter()
        chunks = split_lm(graphs, layout, flat, float(max_chunk_mb), bytes_per_weight(comp))
        timings["split"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        convert_chunks(chunks, opts, meta, say, comp)
        timings["convert"] = time.perf_counter() - t0
        lm_compression = None
        if comp is not None:
            from anefx.lm.compress import LMCompression

            lm_compression = LMCompression(comp, chunks.chunks[-1].compression, chunks=chunks)
        compiled = CompiledLM(
            layout,
            prefill_length,
            graphs,
            reports,
            None,
            meta,
            eos,
            timings=timings,
            examples=flat,
            compression=lm_compression,
            vocab_size=vocab,
            chunks=chunks,
        )
    elif convert:
        functions = {}
        for fn in FUNCTIONS:
            say(f"convert:{fn}")
            functions[fn] = convert_function(fn, graphs[fn], layout, examples[fn], opts)
            timings[f"convert:{fn}"] = functions[fn].seconds
            reports[fn].conversion = {
                "target": "coreml",
                "seconds": round(functions[fn].seconds, 3),
                "ops": dict(sorted(functions[fn].op_histogram().items())),
            }
        say("merge")
        t0 = time.perf_counter()
        fp16_functions = functions
        lm_compression = None
        if comp is not None:
            package, lm_compression = _compress_and_merge(functions, comp, examples, meta, say)
            timings["compress"] = lm_compression.seconds
        else:
            package = merge(functions, meta)
        timings["merge"] = time.perf_counter() - t0 - timings.get("compress", 0.0)
    if not convert:
        meta, fp16_functions, lm_compression = {}, {}, None
    if max_chunk_mb is None or not convert:
        compiled = CompiledLM(
            layout,
            prefill_length,
            graphs,
            reports,
            package,
            meta,
            eos,
            timings=timings,
            examples=flat,
            compression=lm_compression,
            fp16_functions=fp16_functions,
            vocab_size=vocab,
        )

    if check_tokens:
        say("check")
        t0 = time.perf_counter()
        compiled.check = end_to_end_check(compiled, model, check_prompt, check_tokens, vocab)
        timings["check"] = time.perf_counter() - t0
        if not compiled.check.tokens_equal:
            raise GenerationMismatch(
                f"{compiled.check}: reference {compiled.check.reference}, compiled {compiled.check.compiled}. "
                "A pass changed what the model generates; rerun with ANEFX_DUMP_DIR set and compare the reports "
                "of both functions"
            )
    if lm_compression is not None and quality_tokens:
        t0 = time.perf_counter()
        _measure(compiled, quality_prompts, quality_tokens, say)
        timings["quality"] = time.perf_counter() - t0
    return compiled


def _check_deploy_options(model, compression, max_chunk_mb, convert: bool):
    """Resolve ``compression=`` and check ``max_chunk_mb=`` before any long work starts (compile_lm
    always targets iOS18 or later: every scheme anefx ships fits it)."""
    from anefx.targets.chunking import check_cap
    from anefx.targets.compression import bytes_per_weight, check_deployment_target, resolve

    comp = resolve(compression)
    if comp is not None:
        if not convert:
            raise AnefxError("compression= compresses the converted programs: it needs convert=True")
        check_deployment_target(comp, "coreml", "iOS18")
    if max_chunk_mb is not None:
        if not convert:
            raise AnefxError("max_chunk_mb= splits the converted package: it needs convert=True")
        check_cap(list(model.named_parameters()), float(max_chunk_mb), bytes_per_weight(comp))
    return comp


def _compress_and_merge(functions, comp, examples, meta, progress):
    """Compress both functions (shared tables), merge them into one package with ``meta``."""
    from anefx.lm.compress import LMCompression, compress_functions

    t0 = time.perf_counter()
    compressed_functions, per_function = compress_functions(functions, comp, examples, progress)
    seconds = time.perf_counter() - t0
    package = merge(compressed_functions, meta)
    return package, LMCompression(comp, per_function, seconds=seconds)


def _measure(compiled: CompiledLM, prompts, new_tokens: int, progress) -> None:
    from anefx.lm.compress import default_prompts, measure_lm

    if progress:
        progress("quality")
    if prompts is None:
        prompts = default_prompts(compiled.vocab_size)
    compiled.compression.lm = measure_lm(compiled, prompts, new_tokens)


def end_to_end_check(compiled: CompiledLM, model, prompt, new_tokens: int, vocab: int) -> EndToEndCheck:
    """Greedy tokens of the compiled generator against the original model's, with per-step logit error."""
    if prompt is None:
        length = min(
            compiled.prefill_length + max(1, compiled.prefill_length // 4), compiled.context_length - new_tokens
        )
        gen = torch.Generator().manual_seed(1234)
        prompt = torch.randint(0, vocab, (1, max(1, length)), generator=gen)
    prompt = torch.as_tensor(prompt).long().reshape(1, -1)
    new_tokens = min(new_tokens, compiled.context_length - prompt.shape[1])
    ref_tokens, ref_logits = _reference_generate(model, prompt, new_tokens, compiled.eos_token_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled.generate(prompt, new_tokens)
    worst = 0.0
    for a, b in zip(out.logits, ref_logits, strict=False):
        worst = max(worst, float((a.double() - b.double()).abs().max()))
    if math.isnan(worst):
        worst = math.inf
    return EndToEndCheck(
        prompt.shape[1], len(out.new_tokens), out.new_tokens == ref_tokens, worst, ref_tokens, out.new_tokens
    )
