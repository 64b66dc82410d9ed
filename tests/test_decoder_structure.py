"""Norms, LM heads and flattened projections of decoders, judged on the converted MIL program and
against the eager model on inputs the compile never saw."""

import numpy as np
import pytest
import torch
from test_decoder_capture import _inputs, _main_output, _reinit, decoder

import anefx
from anefx.targets.coreai import available as coreai_available


def _mil_shapes(compiled, op_type):
    return [tuple(op.outputs[0].shape) for op in compiled.artifact.operations() if op.op_type == op_type]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# fresh full-size DistilBERT (identity LayerNorm weights): every norm fused, in
# tests/test_transformers_structure.py::test_full_size_distilbert_matches_apples_structure


@pytest.mark.parametrize("layers", [2, 4])
def test_llama_rms_norms_are_one_layer_norm_each(layers):
    model = decoder("llama", layers=layers)
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask))
    hist = compiled.op_histogram()
    n_norms = 2 * layers + 1
    assert hist["layer_norm"] == n_norms
    assert hist["reduce_mean"] == 0 and hist["rsqrt"] == 0 and hist["pow"] == 0
    # each normalises [x, -x]: 2C channels on axis 1 of (B, 2C, 1, S)
    assert set(_mil_shapes(compiled, "layer_norm")) == {(1, 128, 1, 8)}
    for seed, pad in ((3, 0), (4, 2)):
        ids2, mask2 = _inputs(pad=pad, seed=seed)
        with torch.no_grad():
            want = model(ids2, mask2, use_cache=False).last_hidden_state
        assert _rel(compiled(ids2, mask2).last_hidden_state, want) < 1e-4


@pytest.mark.skipif(not coreai_available()[0], reason=coreai_available()[1])
@pytest.mark.parametrize("factory", ["llama", "distilbert_small"])
def test_core_ai_converts_the_fused_norms(factory):
    if factory == "llama":
        model, args, kwargs = decoder("llama"), _inputs(), {}
    else:
        from examples.models import distilbert_small

        model, args, kwargs = distilbert_small()
    compiled = anefx.compile(model, args, kwargs, target="coreai")
    hist = compiled.op_histogram()
    assert hist["reduce_mean"] >= 2 and hist["rsqrt"] >= 1  # the decomposition of each channel norm
    assert hist["conv2d"] >= 4


def _tables(compiled, vocab: int, channels: int) -> int:
    """How many constants of the converted program hold a (V, C) embedding-sized table."""
    return sum(
        1
        for op in compiled.artifact.operations()
        if op.op_type == "const" and np.size(op.outputs[0].val) == vocab * channels
    )


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_is_a_conv_and_a_tied_table_is_stored_once(tied, tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,  # no projection of the table's size
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = _reinit(tf.LlamaForCausalLM(cfg))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask))
    hist = compiled.op_histogram()
    assert hist["linear"] == 0
    assert (1, 96, 1, 8) in _mil_shapes(compiled, "conv")  # the vocabulary projection, in (B, V, 1, S)
    assert _tables(compiled, 96, 64) == (1 if tied else 2)
    rec = compiled.report.record("linear_to_conv")
    assert rec.stats.get("tied_embeddings", 0) == (1 if tied else 0)
    out = compiled.mlmodel.get_spec().description.output
    assert [o.name for o in out] == ["logits"]
    assert list(out[0].type.multiArrayType.shape) == [1, 8, 96]  # the model's own (B, S, V)
    weights = tmp_path / "m.mlpackage"
    compiled.save(weights)
    size = (weights / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    n_params = sum(p.numel() for p in model.parameters())  # a tied table counts once
    assert size < 2 * n_params * 1.05  # fp16: no second copy of a 96x64 table (12 KiB)
    ids2, mask2 = _inputs(pad=3, seed=7)
    with torch.no_grad():
        want = model(ids2, mask2, use_cache=False).logits
    got = compiled(ids2, mask2).logits
    assert got.shape == (1, 8, 96) and _rel(got, want) < 1e-4


@pytest.mark.parametrize("layers", [2, 4])
def test_opt_ffn_stays_in_bc1s(layers):
    import transformers as tf

    cfg = tf.OPTConfig(
        vocab_size=96,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    torch.manual_seed(0)
    model = _reinit(tf.OPTModel(cfg))
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask))
    assert compiled.report.record("linear_to_conv").stats["unflattened"] == layers
    convs = _mil_shapes(compiled, "conv")
    assert len(convs) == 6 * layers
    assert all(s[0] == 1 and s[2:] == (1, 8) for s in convs), convs  # (B, C, 1, S), never (B*S, C, 1, 1)
    assert compiled.op_histogram()["reshape"] == 0
    for seed, pad in ((5, 0), (6, 3)):
        ids2, mask2 = _inputs(pad=pad, seed=seed)
        with torch.no_grad():
            want = _main_output(model(ids2, mask2, use_cache=False))
        assert _rel(_main_output(compiled(ids2, mask2)), want) < 1e-4
