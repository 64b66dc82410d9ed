"""Encoder-decoder step functions (``encode``, ``prefill``, ``decode``) in eager PyTorch against the
stock ``transformers`` models: Whisper (80 mel bins), T5 (relative position bias), BART.

Each model is small with random weights (``examples.models.random_weights``: nothing zero or
identity), and its greedy generation depends on its input: the tests compare 32 new tokens and every
step's logits with ``model.generate(do_sample=False)`` on inputs the step functions were not built
with, a padded source for the text models."""

from __future__ import annotations

import warnings

import pytest
import torch

from anefx.ir.errors import AnefxError
from anefx.lm.encoder_decoder import ENCODER_MASK, MASKED, PositionBias, probe_encoder_decoder, step_functions
from examples.models import tiny_bart, tiny_t5, tiny_whisper

CONTEXT = 64
PREFILL = 4
NEW_TOKENS = 32


def _hf_generate(model, inputs, mask, n):
    kwargs = {} if mask is None else {"attention_mask": mask}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = model.generate(
            inputs,
            **kwargs,
            max_new_tokens=n,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    steps = len(out.logits)
    return [int(t) for t in out.sequences[0, -steps:]], [lg[0] for lg in out.logits]


def _generate(layout, encode, step, inputs, mask, start, n):
    """Greedy generation with the step functions: encode once, prefill the start tokens (padded to
    PREFILL), one decode call per token; stops after an EOS as generate() does."""
    eos = 2 if layout.source.name == "input_features" else 1
    with torch.no_grad():
        cross = list(encode(inputs) if mask is None else encode(inputs, mask))[1:]  # after encoder_length
        own = layout.decoder.zeros()

        def call(ids, positions):
            nonlocal own
            out = step(
                torch.tensor([ids], dtype=torch.int32), torch.tensor([positions], dtype=torch.int32), *own, *cross
            )
            own = list(out[1:])
            return out[0][0]

        logits = call(start + [0] * (PREFILL - len(start)), list(range(PREFILL)))[len(start) - 1]
        tokens, steps = [], []
        for pos in range(len(start), len(start) + n):
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos:
                break
            logits = call([tokens[-1]], [pos])[0]
    return tokens, steps, cross


def _source(ids: torch.Tensor, length: int):
    """Right-pad a (1, n) source to ``length`` tokens: ids and mask, int32."""
    n = ids.shape[1]
    src = torch.zeros(1, length, dtype=torch.int32)
    src[0, :n] = ids[0]
    keep = torch.zeros(1, length, dtype=torch.int32)
    keep[0, :n] = 1
    return src, keep


@pytest.fixture(scope="module")
def whisper():
    model = tiny_whisper()
    layout = probe_encoder_decoder(model, CONTEXT)
    return model, layout, *step_functions(model, layout)


@pytest.fixture(scope="module", params=["t5", "bart"])
def text_model(request):
    model = {"t5": tiny_t5, "bart": tiny_bart}[request.param]()
    layout = probe_encoder_decoder(model, CONTEXT, source_length=20)
    return model, layout, *step_functions(model, layout)


def _check_against_hf(model, layout, encode, step, inputs, mask, hf_inputs, hf_mask):
    ref_tokens, ref_logits = _hf_generate(model, hf_inputs, hf_mask, NEW_TOKENS)
    start = [model.generation_config.decoder_start_token_id]
    tokens, logits, _ = _generate(layout, encode, step, inputs, mask, start, NEW_TOKENS)
    assert tokens == ref_tokens
    for mine, ref in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    return tokens


def test_whisper_layout(whisper):
    _model, layout, _, _ = whisper
    assert layout.source.name == "input_features" and layout.source.shape == (1, 80, 60)
    assert layout.encoder_length == 30 and layout.cross_length == 32  # padded to a multiple of 32
    assert layout.states["cross_key_0"] == (1, 4, 16, 32)  # keys-last, as the self-attention caches
    assert layout.states["cross_value_0"] == (1, 4, 16, 32)
    assert layout.states["key_cache_1"] == (1, 4, 16, CONTEXT)  # self-attention: keys-last, as a causal LM's
    assert layout.states[ENCODER_MASK] == (1, 1, 1, 32)
    assert list(layout.states)[-1] == ENCODER_MASK
    assert layout.vocab_size == 256


def test_whisper_greedy_equals_generate(whisper):
    model, layout, encode, step = whisper
    runs = []
    for seed, scale in ((11, 1.0), (12, 3.0)):  # never seen when the step functions were built
        feats = torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(seed)) * scale
        runs.append(_check_against_hf(model, layout, encode, step, feats, None, feats, None))
    assert len(runs[0]) == NEW_TOKENS and runs[0] != runs[1]  # the encoder's input steers the tokens


def test_text_greedy_equals_generate_padded_source(text_model):
    model, layout, encode, step = text_model
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (2, 14), generator=gen)
    hf_mask = torch.ones_like(ids)
    hf_mask[1, 9:] = 0  # the second source is padded inside the batch HF generates
    runs = []
    for row in range(2):
        n = int(hf_mask[row].sum())
        src, keep = _source(ids[row : row + 1, :n], layout.source.shape[1])
        runs.append(
            _check_against_hf(model, layout, encode, step, src, keep, ids[row : row + 1], hf_mask[row : row + 1])
        )
    assert runs[0] != runs[1]


def test_padded_slots_are_never_attended(whisper, text_model):
    """Garbage in the cross states' padding slots (beyond the encoder's length, or masked source
    tokens) changes nothing: the encoder mask travels with the states (Whisper's decoder has no
    encoder mask of its own: anefx's view gives it one)."""
    for _model, layout, encode, step in (whisper, text_model):
        if layout.source.is_tokens:
            src, keep = _source(torch.arange(3, 13).unsqueeze(0), layout.source.shape[1])
            length, *cross = encode(src, keep)
            assert length.tolist() == [10]
            padded = slice(10, None)
        else:
            length, *cross = encode(torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(5)))
            assert length.tolist() == [layout.encoder_length]
            padded = slice(layout.encoder_length, None)
        mask = cross[-1]
        assert mask[..., padded].eq(MASKED).all() and mask[..., : padded.start].eq(0).all()
        for state in cross[:-1]:  # keys-last: positions on the last axis
            assert state[..., layout.encoder_length :].abs().sum() == 0  # padding slots written as zeros
        noisy = [s.clone() for s in cross]
        for s in noisy[:-1]:
            s[..., padded] = torch.randn(s[..., padded].shape, generator=torch.Generator().manual_seed(9)) * 10
        ids = torch.tensor([[5, 6, 7, 8]], dtype=torch.int32)
        positions = torch.arange(4, dtype=torch.int32).unsqueeze(0)
        with torch.no_grad():
            clean = step(ids, positions, *layout.decoder.zeros(), *cross)[0]
            dirty = step(ids, positions, *layout.decoder.zeros(), *noisy)[0]
            torch.testing.assert_close(dirty, clean)
            unmasked = step(ids, positions, *layout.decoder.zeros(), *noisy[:-1], torch.zeros_like(mask))[0]
        assert (unmasked - clean).abs().max() > 1e-2  # the mask is what hides them


def test_t5_relative_bias_is_a_table_per_head():
    """The decoder's relative position bias is tabulated once over the decoder positions with the
    model's own compute_bias; the table's rows at any chunk equal compute_bias there, and the
    decoder graph computes no buckets (no log) and no gather of the bias."""
    model = tiny_t5()
    layout = probe_encoder_decoder(model, CONTEXT, source_length=20)
    _, step = step_functions(model, layout)
    tables = {k: t for k, t in step.adapted.tables.items()}
    causal = [t for t in tables.values() if t.causal]
    assert len(causal) == 1 and len(tables) == 2  # decoder and encoder (T5 computes it in block 0)
    table = causal[0]
    assert table.weight.shape == (4 * CONTEXT, CONTEXT)  # (heads · context, context)
    attention = model.decoder.block[0].layer[0].SelfAttention
    for offset, tokens in ((0, 4), (7, 1), (CONTEXT - 1, 1)):
        torch.testing.assert_close(
            table(torch.tensor(offset), tokens), attention.compute_bias(tokens, CONTEXT, past_seen_tokens=offset)
        )
    ids = torch.zeros(1, 1, dtype=torch.int32)
    ep = torch.export.export(step, (ids, torch.tensor([[3]], dtype=torch.int32), *layout.zeros()), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.log.default" not in targets
    assert isinstance(table, PositionBias)


def test_encode_keeps_only_the_cross_projections(whisper):
    """``encode`` runs one decoder step so that the model's own code projects the encoder output;
    what the cross states do not need is dead code (no token embedding, no LM head)."""
    from anefx.ir.graph import dce

    _model, layout, encode, _ = whisper
    gm = torch.export.export(encode, (torch.randn(1, 80, 60),), strict=False).module()
    dce(gm.graph)
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert not any("embed_tokens" in t or "proj_out" in t or "decoder.layers.0.self_attn" in t for t in read)
    assert sum("encoder_attn.k_proj" in t for t in read) == 2 and sum("encoder_attn.q_proj" in t for t in read) == 0
    assert len(next(iter(gm.graph.find_nodes(op="output"))).args[0]) == len(layout.cross.state_names) + 2


def test_the_users_model_is_not_modified():
    model = tiny_whisper()
    before = {n: p for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    layout = probe_encoder_decoder(model, CONTEXT)
    encode, step = step_functions(model, layout)
    encode(torch.randn(1, 80, 60))
    assert dict(model.named_modules()) == modules
    assert all("forward" not in vars(m) for m in model.modules())
    assert {n: p for n, p in model.named_parameters()} == before
    shared = dict(step.named_parameters())
    assert (
        shared["adapted.model.model.decoder.layers.0.encoder_attn.k_proj.weight"]
        is before["model.decoder.layers.0.encoder_attn.k_proj.weight"]
    )


def test_errors():
    from examples.models import tiny_llama_lm

    with pytest.raises(AnefxError, match="not an encoder-decoder"):
        probe_encoder_decoder(tiny_llama_lm(), CONTEXT)
    with pytest.raises(AnefxError, match="source_length"):
        probe_encoder_decoder(tiny_bart(), CONTEXT)


def _whisper_with_languages(**settings):
    model = tiny_whisper()
    config = model.generation_config
    config.lang_to_id = {"<|en|>": 250, "<|fr|>": 251}
    config.task_to_id = {"transcribe": 252, "translate": 253}
    config.no_timestamps_token_id = 254
    config.is_multilingual = True
    config.suppress_tokens = [3, 4, 5, 30]
    config.begin_suppress_tokens = [6, 233]
    for k, v in settings.items():
        setattr(config, k, v)
    return model


@pytest.mark.parametrize(
    "settings",
    [{}, {"language": "fr"}, {"language": "french", "task": "translate"}, {"task": "translate"}],
    ids=["detected", "language", "language-task", "task"],
)
def test_whisper_start_tokens_and_processors_follow_generate(settings):
    """Start tokens (language set or detected, task, no-timestamps) and the suppressed tokens of the
    generation config, as generate() applies them: greedy with the full model and these equals
    generate()."""
    from anefx.lm.processors import logits_processor, start_tokens

    model = _whisper_with_languages(**settings)
    feats = torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = model.generate(feats, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)

        def logits(tokens):
            return model(input_features=feats, decoder_input_ids=torch.tensor([tokens])).logits[0, -1]

        tokens = start_tokens(model, first_logits=logits)
        process = logits_processor(model.generation_config, len(tokens), 8, [2])
        seq = list(tokens)
        for _ in range(8):
            seq.append(int(process(seq, logits(seq)).argmax()))
    assert seq == ref.sequences[0].tolist()
    assert 254 in tokens and (settings.get("task") != "translate" or 253 in tokens)


def test_bart_processors_follow_generate():
    """bart-large-cnn-style generation settings: forced first and last tokens, no repeated 3-grams,
    a minimum length and a repetition penalty, followed as generate() follows them greedily."""
    from anefx.lm.processors import logits_processor, not_followed, start_tokens

    model = tiny_bart()
    config = model.generation_config
    config.update(forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3, min_length=6)
    config.update(repetition_penalty=1.3, num_beams=4, eos_token_id=2)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    n = 12
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, max_new_tokens=n, do_sample=False, num_beams=1)[0].tolist()
        tokens = start_tokens(model)
        process = logits_processor(config, len(tokens), n, [2])
        seq = list(tokens)
        while len(seq) < len(tokens) + n and (len(seq) == len(tokens) or seq[-1] != 2):
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(process(seq, logits).argmax()))
    assert seq == ref and seq[1] == 0 and seq[-1] == 2
    assert not_followed(config) == {}
    config.update(encoder_no_repeat_ngram_size=2)
    assert not_followed(config) == {"encoder_no_repeat_ngram_size": 2}
