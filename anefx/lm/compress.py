"""Weight compression of a compiled causal LM, measured in PyTorch on the weights that ship.

Both functions (``prefill`` and ``decode``) are converted programs holding the same parameters. Each
is compressed by :func:`anefx.targets.compression.compress_program` (``coremltools.optimize``, the
same per-weight plan), with one :class:`~anefx.targets.compression.SharedKMeans` for both: the
decode function's k-means tables are reused for the prefill function's identical weights, so the two
programs carry identical look-up tables and indices and ``save_multifunction`` stores them once.

Quality, measured on the shipped weights (decompressed from what coremltools produced, run in the
exported stateful programs by :meth:`~anefx.targets.quality.WeightSwap.swap_stateful`): each prompt
of a fixed set is continued greedily by the compiled generator (``new_tokens`` tokens, EOS ignored),
then the ``prefill`` program with the fp16 weights and with the compressed weights scores every
continuation token teacher forced, chunk by chunk with the KV states carried: greedy-token agreement
and mean KL divergence of the next-token distributions (:func:`~anefx.targets.quality.lm_agreement`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from anefx.ir.errors import ConversionError
from anefx.lm.package import FUNCTIONS, LMFunction
from anefx.targets.compression import CompressionOptions, SharedKMeans, compress_program
from anefx.targets.quality import LMQuality, lm_agreement

#: The default fixed prompt set when the caller gives none: 4 seeded random prompts of 16 tokens.
DEFAULT_PROMPTS = 4
DEFAULT_PROMPT_TOKENS = 16
DEFAULT_NEW_TOKENS = 64
#: The fixed text prompts the CLI measures with when the model comes with a tokenizer.
DEFAULT_TEXT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a compiler does in two sentences.",
    "List three uses of a paperclip.",
)


@dataclass
class LMCompression:
    """The compression of a compiled LM: per function plan and errors, and the LM's size vs quality."""

    options: CompressionOptions
    functions: dict[str, Any]  #: function → compression.Compressed (plan, fp16 and compressed programs)
    lm: LMQuality | None = None
    seconds: float = 0.0
    chunks: Any = None  #: a chunked compile's LMChunks (each chunk has its own ``compression``)

    @property
    def quality(self):
        """Per-weight and end-to-end errors of the decode function (a ``CompressionQuality``; of the
        last chunk when chunked)."""
        return self.functions["decode"].quality

    @property
    def size_ratio(self) -> float:
        """Weight bytes of the compressed programs over the fp16 programs' (consts at their MIL widths)."""
        parts = [c.compression["decode"].quality for c in self.chunks.chunks] if self.chunks else [self.quality]
        fp16 = sum(q.bytes_fp16 for q in parts)
        return sum(q.bytes_compressed for q in parts) / fp16 if fp16 else 1.0

    def summary(self) -> dict[str, Any]:
        out = dict(self.quality.summary())
        out["size_ratio"] = round(self.size_ratio, 4)
        if self.chunks:
            out["chunks"] = len(self.chunks.chunks)
        out["weights"] = self.functions["decode"].summary().get("weights", {})
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


def compress_functions(
    functions: dict[str, LMFunction],
    options: CompressionOptions,
    examples: dict[str, tuple],
    progress=None,
    cache: SharedKMeans | None = None,
    param_name=None,
) -> tuple[dict[str, LMFunction], dict[str, Any]]:
    """Compress every function with the same plan and shared k-means tables; returns the compressed
    functions and each function's ``Compressed``. Refuses plans that differ between the functions
    (the package would then store two versions of a weight)."""
    cache = cache if cache is not None else SharedKMeans()
    out, done = {}, {}
    for fn in ("decode", "prefill"):  # decode first: its tables are then reused by prefill
        f = functions[fn]
        if f.exported_program is None:
            raise ConversionError(f"the {fn} function kept no exported program: cannot measure its compression")
        done[fn] = compress_program(
            f.mlmodel, f.exported_program, options, list(examples[fn]), progress, cache, param_name or user_param_name
        )
        out[fn] = LMFunction(fn, done[fn].model, f.seconds, f.exported_program)
    plans = {fn: sorted((w.param, w.scheme) for w in done[fn].weights if w.param) for fn in done}
    if plans["prefill"] != plans["decode"]:
        differ = sorted(set(plans["prefill"]) ^ set(plans["decode"]))[:4]
        raise ConversionError(
            f"prefill and decode would ship different compressions of the same weights ({differ} …): "
            "the package would store both; report this model"
        )
    return {fn: out[fn] for fn in FUNCTIONS}, {fn: done[fn] for fn in FUNCTIONS}


def user_param_name(name: str) -> str:
    """``step.model.model.layers.0.mlp.up_proj.weight`` (the stateful wrapper's path) → the user's
    ``model.layers.0.mlp.up_proj.weight``."""
    return name.removeprefix("step.").removeprefix("model.")


def default_prompts(vocab: int, n: int = DEFAULT_PROMPTS, length: int = DEFAULT_PROMPT_TOKENS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4321)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]


def prefill_logits_fn(stages: list, logits_name: str, variant: str, layout, prefill_length: int):
    """``ids (1, T) → logits (T, vocab)`` of the stateful prefill program(s) with ``variant``'s weights
    (``"fp16"`` or ``"compressed"``), prefilled chunk by chunk with the states carried. ``stages``:
    ``(Compressed, value inputs, value outputs)`` per package of the chain; ``logits_name`` is the
    value holding the logits."""
    runs = [(c.swap, c.overrides(variant), ins, outs) for c, ins, outs in stages]

    def fn(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(1, -1)
        states = dict(zip(layout.state_names, layout.zeros(), strict=True))
        rows = []
        for start in range(0, ids.shape[1], prefill_length):
            chunk = ids[0, start : start + prefill_length]
            n = chunk.numel()
            padded = torch.zeros(1, prefill_length, dtype=torch.int32)
            padded[0, :n] = chunk
            positions = torch.arange(start, start + prefill_length, dtype=torch.int32).unsqueeze(0)
            env = {"input_ids": padded, "position_ids": positions}
            for swap, over, ins, outs in runs:
                values, new = swap.swap_stateful([env[k] for k in ins], over, states)
                env.update(zip(outs, values, strict=True))
                states.update(new)
            rows.append(env[logits_name][0, :n].float())
        return torch.cat(rows)

    return fn


def prefill_stages(compiled) -> tuple[list, str]:
    """The prefill programs of a compressed compile in chain order, and the name of the logits value
    (see :func:`prefill_logits_fn`)."""
    if compiled.chunks is None:
        return [(compiled.compression.functions["prefill"], ["input_ids", "position_ids"], ["logits"])], "logits"
    stages = [
        (c.compression["prefill"], c.value_inputs("prefill"), c.value_outputs("prefill"))
        for c in compiled.chunks.chunks
    ]
    return stages, compiled.chunks.logits["prefill"]


def measure_lm(compiled, prompts, new_tokens: int) -> LMQuality:
    """Greedy-token agreement and mean KL of the compressed weights against the fp16 weights (see the
    module docstring); ``new_tokens`` is capped so every sequence fits the context."""
    import warnings

    prompts = [torch.as_tensor(p).long().reshape(1, -1) for p in prompts]
    longest = max(p.shape[1] for p in prompts)
    n = min(new_tokens, compiled.context_length - longest)
    if n < 1:
        raise ConversionError(
            f"the quality prompts ({longest} tokens) leave no room in the {compiled.context_length}-token context"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sequences = [compiled.generate(p, n, eos_token_id=None).sequences for p in prompts]
    stages, logits = prefill_stages(compiled)
    ref = prefill_logits_fn(stages, logits, "fp16", compiled.layout, compiled.prefill_length)
    cand = prefill_logits_fn(stages, logits, "compressed", compiled.layout, compiled.prefill_length)
    return lm_agreement(ref, cand, sequences, [p.shape[1] for p in prompts])
