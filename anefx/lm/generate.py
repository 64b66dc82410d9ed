"""The generation loop of a compiled causal LM, and the end-to-end token check.

Generation calls the artifact's ``prefill`` and ``decode`` functions through a step (its states
carried from call to call): in PyTorch, or with the target's executor. A prompt is prefilled in
chunks of ``prefill_length`` tokens aligned on its end (``prefill`` returns its last position's
logits only; the first chunk is padded in front with negative positions, which are never written
nor seen), then one ``decode`` call per new token. The compression quality scores whole sequences
teacher forced (:func:`teacher_forced`: the first token prefilled, the others decoded).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from anefx.ir.capture import eval_mode
from anefx.ir.errors import AnefxError

#: The default fixed prompt set of the compression quality when the caller gives none: 4 seeded
#: random prompts of 16 tokens.
DEFAULT_PROMPTS = 4
DEFAULT_PROMPT_TOKENS = 16
#: The fixed text prompts the CLI measures with when the model comes with a tokenizer.
DEFAULT_TEXT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a compiler does in two sentences.",
    "List three uses of a paperclip.",
)


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


#: The least teacher-forced greedy-token agreement the executed package must reach with the model
#: (fp16 can flip a near-tie: a few steps of a random model's flat logits; a package that computes
#: something else agrees on almost none).
MIN_AGREEMENT = 0.75


@dataclass
class EndToEndCheck:
    """The compiled generator against the original model's ``generate(do_sample=False)``.

    ``runtime``: what ran (``"torch"``: the rewritten graphs; ``"target"`` …: the package, fp16
    included). ``tokens_equal``: its own greedy tokens are the reference's. ``agreement``: the
    fraction of steps whose greedy token is the reference's when both read the same context (the
    reference tokens fed back: teacher forced), so one near-tie flipped by fp16 costs one step, not
    the rest of the sequence; ``step_errors``: per step, the largest logit difference in that same
    context (``max_logit_error`` the worst)."""

    prompt_tokens: int
    new_tokens: int
    tokens_equal: bool
    max_logit_error: float
    reference: list[int]
    compiled: list[int]
    runtime: str = "torch"
    agreement: float = 1.0
    step_errors: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "equal" if self.tokens_equal else "DIFFER"
        return (
            f"{self.runtime}: greedy tokens {verdict} to the original model's generate() for {self.new_tokens} new "
            f"tokens from a {self.prompt_tokens}-token prompt; teacher-forced agreement {self.agreement:.0%}, worst "
            f"per-step logit error {self.max_logit_error:.3g}"
        )


#: ``(function, input_ids, position_ids) -> logits`` of one call, states carried by the caller
Step = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def prompt_ids(input_ids, context_length: int) -> list[int]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise AnefxError(f"generate takes one prompt of shape (1, T) or (T,), got {tuple(ids.shape)}")
    prompt = [int(t) for t in ids[0]]
    if not prompt:
        raise AnefxError("generate needs at least one prompt token")
    if len(prompt) > context_length:
        raise AnefxError(
            f"the prompt has {len(prompt)} tokens but the cache holds {context_length} "
            "(context_length): compile with a larger context_length or shorten the prompt"
        )
    return prompt


def prefill(step: Step, prompt: list[int], prefill_length: int, front_pad: bool = True) -> torch.Tensor:
    """Prefill ``prompt``; the next-token logits after its last token.

    ``prefill`` returns the logits of its chunk's last position only, so the chunks are aligned on
    the prompt's end: full chunks of ``prefill_length`` tokens, the first padded in front with
    negative positions (never written to the cache, never attended to). A model that cannot take a
    negative position (a learned absolute position embedding: ``front_pad`` False) prefills the
    full chunks from the start and feeds the remainder through ``decode``."""
    n, p = len(prompt), prefill_length
    last = None
    if front_pad:
        for start in range(n - -(-n // p) * p, n, p):
            pad = max(0, -start)
            ids = torch.tensor([[0] * pad + prompt[max(start, 0) : start + p]], dtype=torch.int32)
            positions = torch.arange(start, start + p, dtype=torch.int32).unsqueeze(0)
            last = step("prefill", ids, positions)[0, -1]
        return last
    full = n // p * p
    for start in range(0, full, p):
        ids = torch.tensor([prompt[start : start + p]], dtype=torch.int32)
        last = step("prefill", ids, torch.arange(start, start + p, dtype=torch.int32).unsqueeze(0))[0, -1]
    for pos in range(full, n):
        last = _decode(step, prompt[pos], pos)
    return last


def next_token_scores(outputs: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """The next-token scores of a call's outputs, (1, T, vocab): its ``logits``, or what a head that
    returns tokens left of them (``LMHeadOptions(output=…)``): ``argmax`` ids as a one-hot, ``topk``
    values at their ids and -inf elsewhere (greedy decoding and sampling within the top k read them
    alike)."""
    if "logits" in outputs:
        return outputs["logits"].float()
    if "token" in outputs:
        ids = outputs["token"].long()
        return torch.nn.functional.one_hot(ids, vocab).float()
    ids, values = outputs["topk_ids"].long(), outputs["topk_values"].float()
    scores = torch.full((*ids.shape[:-1], vocab), -math.inf)
    return scores.scatter(-1, ids, values)


def _decode(step: Step, token: int, pos: int) -> torch.Tensor:
    return step("decode", torch.tensor([[token]], dtype=torch.int32), torch.tensor([[pos]], dtype=torch.int32))[0, 0]


def teacher_forced(step: Step, ids: list[int], prefill_length: int, front_pad: bool = True) -> torch.Tensor:
    """Every position's next-token logits of ``ids`` (T, vocab), from an empty cache: the first token
    prefilled, each next one fed through ``decode``."""
    out = [prefill(step, ids[:1], prefill_length, front_pad)]
    for pos in range(1, len(ids)):
        out.append(
            step("decode", torch.tensor([[ids[pos]]], dtype=torch.int32), torch.tensor([[pos]], dtype=torch.int32))[
                0, 0
            ]
        )
    return torch.stack(out)


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling of the next token, in ``transformers``' order: logits divided by
    ``temperature``, then kept to the ``top_k`` largest, then to the smallest set whose probability
    reaches ``top_p`` (nucleus); one draw from a ``torch.Generator`` seeded with ``seed``, so a
    generation is reproducible."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise AnefxError(f"temperature must be > 0 (greedy decoding is the default), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise AnefxError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise AnefxError(f"top_p must be in (0, 1], got {self.top_p}")

    def picker(self) -> Callable[[torch.Tensor], int]:
        gen = torch.Generator().manual_seed(self.seed)

        def pick(logits: torch.Tensor) -> int:
            scores = logits.double() / self.temperature
            if self.top_k is not None and self.top_k < scores.numel():
                kth = torch.topk(scores, self.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, -math.inf)
            if self.top_p is not None and self.top_p < 1:
                ordered, order = torch.sort(scores, descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) >= self.top_p  # keep the first token reaching top_p
                scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
            return int(torch.multinomial(scores.softmax(-1), 1, generator=gen))

        return pick


def argmax(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def forced(step: Step, prompt: list[int], tokens: list[int], prefill_length: int, front_pad: bool = True) -> list:
    """The logits before each of ``tokens`` when they are fed back one by one after ``prompt``
    (teacher forced): the prefill's (its last position), then one decode call per token but the last."""
    out = [prefill(step, prompt, prefill_length, front_pad).float()]
    for pos, token in enumerate(tokens[:-1], start=len(prompt)):
        out.append(_decode(step, token, pos).float())
    return out


def greedy(
    step: Step,
    prompt: list[int],
    max_new_tokens: int,
    prefill_length: int,
    context_length: int,
    eos: set[int],
    on_token: Callable[[int], None] | None = None,
    front_pad: bool = True,
    pick: Callable[[torch.Tensor], int] = argmax,
    process: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
) -> Generation:
    """Generation: prefill, then one decode call per new token until an EOS id, ``max_new_tokens`` or
    a full cache (with a warning); each token chosen by ``pick`` from its logits (greedy: argmax).
    ``process(tokens so far, logits)``: the logits processors ``generate()`` applies before its
    choice (:mod:`anefx.lm.processors`); the logits recorded are the model's own."""
    last = prefill(step, prompt, prefill_length, front_pad)
    logits_out: list[torch.Tensor] = []
    new: list[int] = []
    stop, message = "max_new_tokens", ""
    pos = len(prompt)
    while len(new) < max_new_tokens:
        token = pick(last if process is None else process(prompt + new, last))
        logits_out.append(last.float())
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            stop = "eos"
            break
        if len(new) == max_new_tokens:
            break
        if pos >= context_length:
            stop = "context_length"
            message = (
                f"stopped after {len(new)} new tokens: the cache is full ({context_length} tokens, "
                "context_length); compile with a larger context_length for longer generations"
            )
            warnings.warn(message, stacklevel=3)
            break
        last = _decode(step, token, pos)
        pos += 1
    return Generation(torch.tensor([prompt + new], dtype=torch.long), new, logits_out, stop, message)


def eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, "eos_token_id", None)
        if value is not None:
            return [value] if isinstance(value, int) else list(value)
    return []


def reference_generate(model, prompt: torch.Tensor, n: int, eos: list[int]) -> tuple[list[int], list[torch.Tensor]]:
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


def end_to_end_check(compiled, model, prompt, new_tokens: int, vocab: int, runtime: str = "torch") -> EndToEndCheck:
    """The compiled generator (``runtime``: the rewritten graphs, or the package with the target's
    executor) against the original model's greedy tokens: its own tokens, and teacher forced the
    agreement and per-step logit error (see :class:`EndToEndCheck`)."""
    if prompt is None:
        length = min(
            compiled.prefill_length + max(1, compiled.prefill_length // 4), compiled.context_length - new_tokens
        )
        gen = torch.Generator().manual_seed(1234)
        prompt = torch.randint(0, vocab, (1, max(1, length)), generator=gen)
    prompt = torch.as_tensor(prompt).long().reshape(1, -1)
    new_tokens = min(new_tokens, compiled.context_length - prompt.shape[1])
    ref_tokens, ref_logits = reference_generate(model, prompt, new_tokens, compiled.eos_token_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled.generate(prompt, new_tokens, runtime=runtime)
        fed = forced(
            compiled.step(runtime), [int(t) for t in prompt[0]], ref_tokens, compiled.prefill_length, compiled.front_pad
        )
    return forced_check([int(t) for t in prompt[0]], out, ref_tokens, ref_logits, fed, runtime)


def forced_check(start: list[int], out, ref_tokens: list[int], ref_logits, fed, runtime: str, process=None):
    """The :class:`EndToEndCheck` of a generation ``out`` that started from ``start``: its tokens
    against the reference's, and the logits ``fed`` (teacher forced with the reference tokens)
    against the reference's logits: per-step error (NaN counted as inf) and the agreement of their
    argmax, after ``process`` (the generation config's logits processors) when given."""
    errors, agree = [], 0
    for i, (a, b) in enumerate(zip(fed, ref_logits, strict=False)):
        error = float((a.double() - b.double()).abs().max())
        errors.append(math.inf if math.isnan(error) else error)
        scores = a if process is None else process(start + ref_tokens[:i], a)
        agree += int(torch.argmax(scores)) == ref_tokens[i]
    return EndToEndCheck(
        len(start),
        len(out.new_tokens),
        out.new_tokens == ref_tokens,
        max(errors, default=0.0),
        ref_tokens,
        out.new_tokens,
        runtime,
        agree / max(len(ref_tokens), 1),
        errors,
    )


def default_prompts(vocab: int, n: int = DEFAULT_PROMPTS, length: int = DEFAULT_PROMPT_TOKENS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4321)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]
