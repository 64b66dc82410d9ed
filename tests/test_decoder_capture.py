"""Capture of decoders as users call them: caches in the outputs are dropped, non-tensor example
inputs are constants of the graph (never graph inputs), anything else is refused by name."""

import pytest
import torch
from torch import nn

import anefx
from anefx.ir.errors import CaptureError
from anefx.ir.graph import op_histogram


def _reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights with nothing zero or identity (norm weights around 1 ± 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.05 * noise)
    return model.eval()


def decoder(kind: str, layers: int = 2):
    """A small ``transformers`` decoder (GQA, sliding window smaller than the sequence for Mistral)."""
    import transformers as tf

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg, cls = {
        "llama": (lambda: tf.LlamaConfig(**common), tf.LlamaModel),
        "llama_lm": (lambda: tf.LlamaConfig(**common, tie_word_embeddings=True), tf.LlamaForCausalLM),
        "qwen3": (lambda: tf.Qwen3Config(**common, head_dim=16), tf.Qwen3Model),
        "mistral": (lambda: tf.MistralConfig(**common, sliding_window=4), tf.MistralModel),
    }[kind]
    torch.manual_seed(0)
    return _reinit(cls(cfg()))


def _inputs(seq: int = 8, pad: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, seq), generator=gen)
    mask = torch.ones(1, seq, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return ids, mask


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "llama_lm", "qwen3", "mistral"])
@pytest.mark.parametrize("kwargs", [{}, {"use_cache": False}], ids=["default", "use_cache_false"])
def test_decoders_capture_and_match_eager_on_unseen_inputs(kind, kwargs):
    model = decoder(kind)
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask), kwargs, convert=False)
    cap = compiled.captured
    assert cap.input_names == ["input_ids", "attention_mask"]  # no bool placeholder
    assert cap.output_names == ["logits" if kind == "llama_lm" else "last_hidden_state"]
    assert cap.dropped_outputs == []  # use_cache=False is implied for transformers models: no cache built
    assert not [r for r in compiled.report.records if r.rolled_back]
    for seed, pad in ((1, 0), (2, 3)):  # other tokens, and a right-padded mask
        ids2, mask2 = _inputs(pad=pad, seed=seed)
        with torch.no_grad():
            want = _main_output(model(ids2, mask2, use_cache=False))
        got = compiled(ids2, mask2, **kwargs)
        assert "past_key_values" not in got
        err = float((_main_output(got) - want).abs().max() / want.abs().max())
        assert err < 1e-4, (kind, pad, err)


def test_cache_free_graph_has_no_empty_concat():
    """DynamicCache starts from an empty tensor and concatenates to it: the default config must give
    the same graph as use_cache=False after canonicalize (no cat with a size-0 operand left)."""
    model = decoder("llama")
    ids, mask = _inputs()
    hist = []
    for kwargs in ({}, {"use_cache": False}):
        compiled = anefx.compile(model, (ids, mask), kwargs, convert=False)
        hist.append(op_histogram(compiled.graph_module))
    assert hist[0] == hist[1]
    assert hist[0]["aten.cat"] >= 2  # rotate_half's cats are real and stay


def test_use_cache_false_converts_with_tensor_inputs_only():
    model = decoder("llama")
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask), {"use_cache": False, "return_dict": True})
    spec = compiled.mlmodel.get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in spec.description.output] == ["last_hidden_state"]


def test_specialised_inputs_are_checked_at_call_time():
    model = decoder("llama")
    ids, mask = _inputs()
    compiled = anefx.compile(model, (ids, mask), {"use_cache": False, "output_attentions": False}, convert=False)
    assert compiled.captured.constants.kwargs == {"use_cache": False, "output_attentions": False}
    compiled(ids, mask)  # left out: the compiled value
    compiled(ids, mask, use_cache=False)  # the same value
    with pytest.raises(CaptureError, match=r"'use_cache' was False .* True now.*compile again"):
        compiled(ids, mask, use_cache=True)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, times: int = 1, bias=None, mode: str = "add"):
        y = self.lin(x) * times
        return y + 1 if mode == "add" else y - 1


def test_positional_and_keyword_constants():
    model = _Scaled().eval()
    x = torch.randn(2, 8)
    cap = anefx.capture(model, (x, 3, None), {"mode": "sub"})
    assert cap.input_names == ["x"]
    assert cap.constants.args == {1: 3, 2: None} and cap.constants.kwargs == {"mode": "sub"}
    x2 = torch.randn(2, 8)
    torch.testing.assert_close(cap.graph_module(x2), model(x2, 3, None, mode="sub"))
    compiled = anefx.compile(model, (x, 3, None), {"mode": "sub"}, convert=False)
    torch.testing.assert_close(compiled(x2, 3, None, mode="sub"), model(x2, 3, mode="sub"))
    with pytest.raises(CaptureError, match=r"'times' was 3 .* 4 now"):
        compiled(x2, 4, None)


def test_mixed_inputs_and_non_tensor_outputs_are_named():
    class Pair(nn.Module):
        def forward(self, xs):
            return xs[0] * 2

    with pytest.raises(CaptureError, match=r"input \"xs\[1\]\" is a str|input 'xs\[1\]' is a str"):
        anefx.capture(Pair(), ((torch.randn(3), "tag"),))

    class Counts(nn.Module):
        def forward(self, x):
            return {"y": x * 2, "n": x.shape[0]}

    with pytest.raises(CaptureError, match=r"output 'n' is a int"):
        anefx.capture(Counts(), (torch.randn(3),))

    class Opaque(nn.Module):
        def forward(self, x, cfg):
            return x * 2

    with pytest.raises(CaptureError, match=r"input 'cfg' is a object"):
        anefx.capture(Opaque(), (torch.randn(3), object()))


def test_cache_in_tuple_output_is_dropped():
    model = decoder("llama")
    ids, mask = _inputs()
    cap = anefx.capture(model, (ids, mask), {"return_dict": False, "use_cache": True})
    assert cap.output_names == ["output_0"]
    assert cap.dropped_outputs == ["output_1"]
    out = cap.graph_module(ids, mask)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], model(ids, mask, use_cache=False).last_hidden_state)
