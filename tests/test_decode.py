"""Decode at the bandwidth floor: the traffic of a compiled decode step, sliding-window rings, long
contexts, prompts of many chunks, the LM head in compile_lm, sampling."""

from __future__ import annotations

import warnings

import pytest
import torch

import anefx
from anefx.ir.errors import AnefxError
from anefx.lm.generate import Sampling
from anefx.targets.lm_head import LMHeadOptions


def _reinit(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    model.generation_config.eos_token_id = None  # generate as many tokens as asked: no EOS
    model.config.eos_token_id = None
    return model.eval()


COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def _llama(vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _reinit(LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": vocab})))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _reinit(MistralForCausalLM(MistralConfig(sliding_window=32, **COMMON)))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _reinit(Gemma2ForCausalLM(Gemma2Config(sliding_window=32, head_dim=16, **COMMON)))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _reinit(
        Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=32, head_dim=16, sliding_window_pattern=2, **COMMON))
    )


def _prompt(n: int, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf(model, prompt, n):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, prompt.shape[1] :]]


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_layers_keep_rings_and_generate_like_hf(arch):
    """Window 32, context 256: the local layers keep 32-slot ring buffers, the global ones the
    context; 200 greedy tokens (six windows past the prompt) equal transformers' generate. Per-pass
    validation at lint: the end-to-end tokens are the check."""
    model = {"mistral": _mistral, "gemma2": _gemma2, "gemma3": _gemma3}[arch]()
    lm = anefx.compile_lm(
        model,
        context_length=256,
        prefill_length=16,
        check_prompt=_prompt(40),
        check_tokens=200,
        convert=False,
        validate="lint",
    )
    assert lm.check.tokens_equal and lm.check.new_tokens == 200, lm.check
    rings = [lm.states[f"key_cache_{i}"][-1] for i in range(2)]
    assert rings == ([32, 32] if arch == "mistral" else [32, 256]), lm.states
    assert all(lm.states[f"value_cache_{i}"][-1] == rings[i] for i in range(2))
    assert all(lm.reports[fn].record("attention_bc1s").stats["keys_last"] == 2 for fn in lm.functions)


def test_long_contexts_and_prompts_of_many_chunks():
    """Contexts 4096 and 2048 compile and generate HF's greedy tokens; at 4096 a prompt of five prefill
    chunks (the first padded in front) attends to what the earlier chunks wrote. The decode step's
    traffic grows with the context by about the cache read once (ESTIMATE, 2048 against 4096)."""
    model = _llama()
    long = anefx.compile_lm(
        model, context_length=4096, prefill_length=16, check_prompt=_prompt(70), check_tokens=8, validate="lint"
    )
    assert long.check.tokens_equal and long.check.prompt_tokens == 70
    assert long.states["key_cache_0"] == (1, 2, 16, 4096)
    for n in (5, 33):  # one short chunk, three chunks
        p = _prompt(n, seed=n)
        assert long.generate(p, 6).new_tokens == _hf(model, p, 6)
    sampled = [
        long.generate(_prompt(5), 8, do_sample=True, temperature=0.8, top_k=20, seed=s).new_tokens for s in (0, 0, 1)
    ]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded: the same seed, the same tokens
    short = anefx.compile_lm(
        model, context_length=2048, prefill_length=16, check_prompt=_prompt(20), check_tokens=4, validate="lint"
    )
    assert short.check.tokens_equal
    growth = long.context_growth(short)
    assert growth.contexts == (2048, 4096)
    assert growth.state_bytes == 2 * 2 * 2 * 16 * 4096 * 2  # K and V, 2 layers, 2 KV heads of 16, fp16
    assert growth.times_cache <= 1.5, str(growth)
    decode = long.traffic("decode")
    assert decode.state_read == decode.state_bytes  # each cache read once
    assert decode.state_written < decode.state_bytes / 64  # one column per state
    assert "grows with the context" in str(growth)


def test_lm_head_argmax_inside_decode_on_a_qwen_sized_vocabulary():
    """151,936 entries: the head split under 65,536 channels, the decode returns token ids, and the
    package run by the MIL interpreter generates transformers' greedy tokens."""
    vocab = 151_936
    model = _llama(vocab)
    prompt = _prompt(20, vocab=vocab)
    lm = anefx.compile_lm(
        model,
        context_length=64,
        prefill_length=16,
        check_prompt=prompt,
        check_tokens=6,
        lm_head=LMHeadOptions(output="argmax"),
    )
    assert lm.check.tokens_equal
    assert lm.generate(prompt, 6, runtime="target").new_tokens == _hf(model, prompt, 6)
    for fn in lm.functions:
        convs = [op for op in lm.package.operations(fn) if op.op_type == "conv"]
        widest = max(op.outputs[0].shape[1] for op in convs)
        assert widest <= 65536, (fn, widest)
        assert lm.op_histogram(fn)["reduce_argmax"] == 1  # the logits never leave the program
    assert lm.reports["decode"].conversion["lm_head"]["output"] == "argmax"


def test_seeded_sampling():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen)
    greedy = int(logits.argmax())
    assert Sampling(top_k=1).picker()(logits) == greedy
    assert Sampling(top_p=1e-6).picker()(logits) == greedy  # the nucleus holds the top token only
    assert Sampling(temperature=1e-4).picker()(logits) == greedy
    a = [Sampling(seed=3).picker()(logits) for _ in range(3)]
    pick = Sampling(seed=3).picker()
    assert a == [Sampling(seed=3).picker()(logits)] * 3 and len({pick(logits) for _ in range(40)}) > 3
    top = Sampling(top_k=3, seed=1).picker()
    assert {top(logits) for _ in range(60)} <= set(torch.topk(logits, 3).indices.tolist())
    for bad in (dict(temperature=0), dict(top_k=0), dict(top_p=1.5)):
        with pytest.raises(AnefxError):
            Sampling(**bad)
