"""What ``transformers``' ``generate()`` does around the greedy argmax: the decoder's start tokens and
the logits processors of the generation config.

The compiled generator follows them so that its tokens equal ``model.generate(do_sample=False,
num_beams=1)`` on real checkpoints too, whose generation configs suppress tokens (Whisper), force a
first or last token (BART) or forbid repeated n-grams. The processors are ``transformers``' own
public classes, built from the generation config the way ``generate()`` builds them; the ones that
change greedy tokens and are not followed (:data:`NOT_FOLLOWED`) are named, and the end-to-end check
turns them off in the reference as well.

Start tokens (encoder-decoder models): ``decoder_start_token_id``; for a speech model whose
generation config names languages and tasks (Whisper: ``lang_to_id``, ``task_to_id``,
``no_timestamps_token_id``) also the language (``generation_config.language``, or detected as
``generate()`` detects it: the language token with the largest logit after the start token), the
task (``generation_config.task``; ``transcribe`` when only a language is set) and the no-timestamps
token unless ``return_timestamps``. Explicit ``decoder_input_ids`` replace all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anefx.ir.errors import AnefxError

#: generation-config fields that change greedy tokens and that the compiled generator does not follow
NOT_FOLLOWED = (
    "bad_words_ids",
    "sequence_bias",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
)
#: their values that change nothing
_NEUTRAL = {"encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0}

#: ``(decoder tokens so far, next-token logits (vocab,)) -> processed logits``
Process = Callable[[list[int], torch.Tensor], torch.Tensor]


def generation_config(model):
    config = getattr(model, "generation_config", None)
    return config if config is not None else getattr(model, "config", None)


def not_followed(config) -> dict[str, object]:
    """The fields of ``config`` set to a value that changes greedy tokens and that anefx ignores."""
    out = {}
    for name in NOT_FOLLOWED:
        value = getattr(config, name, None)
        if value is not None and value != _NEUTRAL.get(name):
            out[name] = value
    return out


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def logits_processor(config, prompt_length: int, max_new_tokens: int, eos: list[int]) -> Process | None:
    """The processors ``generate()`` builds from ``config`` for greedy decoding (repetition penalty,
    no-repeat n-grams, minimum lengths, forced first/last tokens, suppressed tokens), as one function;
    None when there are none. ``prompt_length``: the decoder tokens before the first generated one."""
    if config is None:
        return None
    from transformers.generation.logits_process import (
        ForcedBOSTokenLogitsProcessor,
        ForcedEOSTokenLogitsProcessor,
        LogitsProcessorList,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensAtBeginLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    get = lambda name: getattr(config, name, None)  # noqa: E731
    eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
    processors = LogitsProcessorList()
    if get("repetition_penalty") not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(float(get("repetition_penalty"))))
    if get("no_repeat_ngram_size"):
        processors.append(NoRepeatNGramLogitsProcessor(int(get("no_repeat_ngram_size"))))
    if get("min_length") and eos_t is not None:
        processors.append(MinLengthLogitsProcessor(int(get("min_length")), eos_t))
    if get("min_new_tokens") and eos_t is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, int(get("min_new_tokens")), eos_t))
    if get("forced_bos_token_id") is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(int(get("forced_bos_token_id"))))
    if get("forced_eos_token_id") is not None:
        forced = _ids(get("forced_eos_token_id"))
        processors.append(ForcedEOSTokenLogitsProcessor(prompt_length + max_new_tokens, forced))
    if get("suppress_tokens"):
        processors.append(SuppressTokensLogitsProcessor(_ids(get("suppress_tokens"))))
    if get("begin_suppress_tokens"):
        begin = prompt_length + (1 if prompt_length == 1 and get("forced_bos_token_id") is not None else 0)
        processors.append(SuppressTokensAtBeginLogitsProcessor(_ids(get("begin_suppress_tokens")), begin))
    if not processors:
        return None

    def process(tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long)
        return processors(ids, logits.float().unsqueeze(0).clone())[0]

    return process


def _language_token(config, language: str) -> int:
    table = config.lang_to_id
    for key in (language, f"<|{language}|>", f"<|{language.lower()}|>"):
        if key in table:
            return int(table[key])
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = TO_LANGUAGE_CODE.get(language.lower())
    if code is not None and f"<|{code}|>" in table:
        return int(table[f"<|{code}|>"])
    raise AnefxError(f"the generation config has no language {language!r}; it knows {sorted(table)}")


def start_tokens(
    model, decoder_input_ids=None, first_logits: Callable[[list[int]], torch.Tensor] | None = None
) -> list[int]:
    """The decoder's start tokens (see the module docstring). ``first_logits(tokens)`` gives the
    next-token logits after ``tokens``: how the language is detected when the config sets none."""
    if decoder_input_ids is not None:
        ids = [int(t) for t in torch.as_tensor(decoder_input_ids).reshape(-1)]
        if not ids:
            raise AnefxError("decoder_input_ids is empty")
        return ids
    config = generation_config(model)
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    if start is None:
        raise AnefxError("the model has no decoder_start_token_id: pass decoder_input_ids")
    tokens = [int(start)]
    lang_to_id = getattr(config, "lang_to_id", None)
    task_to_id = getattr(config, "task_to_id", None)
    language, task = getattr(config, "language", None), getattr(config, "task", None)
    if language is None and task is None:
        forced = getattr(config, "forced_decoder_ids", None)  # the legacy spelling of both
        for position, token in sorted(forced or []):
            if position == len(tokens) and token is not None:
                tokens.append(int(token))
    if lang_to_id:
        if language is not None:
            tokens[1:2] = [_language_token(config, language)]
        elif len(tokens) == 1:
            if first_logits is None:
                raise AnefxError("the language is neither set nor detectable here: pass decoder_input_ids")
            logits = first_logits(tokens[:1])
            ids = sorted(int(i) for i in lang_to_id.values())
            tokens.append(ids[int(torch.argmax(logits[ids]))])
    if task_to_id:
        if task is not None:
            task_ids = {int(v) for v in task_to_id.values()}
            tokens = [t for t in tokens if t not in task_ids] + [int(task_to_id[task])]
        elif language is not None and not any(t in tokens for t in (int(v) for v in task_to_id.values())):
            tokens.append(int(task_to_id["transcribe"]))
    no_timestamps = getattr(config, "no_timestamps_token_id", None)
    if no_timestamps is not None:
        stamps = bool(getattr(config, "return_timestamps", False))
        if not stamps and tokens[-1] != no_timestamps:
            tokens.append(int(no_timestamps))
        elif stamps and tokens[-1] == no_timestamps:
            tokens.pop()
    return tokens
