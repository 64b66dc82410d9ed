"""Issue 4's done-when: stock transformers models reach Apple's hand-written ANE structure.

Measured on the Core ML program's MIL ops (``compiled.artifact.operations()``).
"""

import coremltools as ct
import pytest
import torch

import anefx
from helpers import example

PROJECTION_OPS = ("linear", "matmul")


def _softmax_axes(compiled):
    main = compiled.artifact.package.mil_program.functions["main"]
    return {int(op.inputs["axis"].val) for op in main.operations if op.op_type == "softmax"}


def _last_hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_size_distilbert_matches_apples_structure(attn, tmp_path):
    """Stock DistilBertModel(DistilBertConfig()), sequence 128: the reference model of the core path,
    fresh from its config (identity LayerNorm weights used to leave 24 reduce_mean unfused). The one
    place the full-size model is compiled for Core ML in the tests (each compile takes a minute)."""
    model, args, kwargs = example("distilbert", attn=attn)
    assert sum(p.numel() for p in model.parameters()) > 60_000_000
    compiled = anefx.compile(model, args, kwargs)
    assert [r.name for r in compiled.report.records] == anefx.Pipeline.default().names
    ops = compiled.op_histogram()
    assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0, ops
    assert ops["conv"] == 36 and ops.get("reshape", 0) == 0, ops
    assert ops["layer_norm"] == 13 and ops.get("reduce_mean", 0) == 0 and ops.get("rsqrt", 0) == 0, ops
    assert ops["transpose"] <= 8, ops
    assert ops["einsum"] == 2 * 12 * 6 and ops["softmax"] == 12 * 6
    assert _softmax_axes(compiled) == {1}  # per head, over the key axis of (B, S_k, 1, S_q)
    assert not compiled.report.rolled_back
    for pad in (0, 37):  # without and with padding in the attention mask
        mask = kwargs["attention_mask"].clone()
        if pad:
            mask[:, -pad:] = 0
        ref = _last_hidden(model(*args, attention_mask=mask))
        out = _last_hidden(compiled(*args, attention_mask=mask))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if attn == "sdpa":  # and it saves as an ML Program
        spec = ct.utils.load_spec(str(compiled.save(tmp_path / "distilbert.mlpackage")))
        assert spec.WhichOneof("Type") == "mlProgram"
        assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_structure_is_independent_of_depth(name):
    counts = {}
    for layers in (2, 4):
        model, args, kwargs = example(name, layers=layers)
        compiled = anefx.compile(model, args, kwargs)
        ops = compiled.op_histogram()
        for op in PROJECTION_OPS:
            assert ops.get(op, 0) == 0, (name, layers, ops)
        assert ops["conv"] == 6 * layers + (1 if name == "vit" else 0)
        assert compiled.max_error() < 1e-4
        # one K transpose per layer (Apple's structure), plus a constant number of layout changes
        counts[layers] = ops["transpose"] - layers
    assert counts[2] == counts[4]
    if name == "vit":
        assert counts[2] == 1  # the patch-embedding conv feeds the encoder without a transpose


def test_bert_with_padding_and_eager():
    model, args, kwargs = example("bert", attn="eager", pad=5)
    compiled = anefx.compile(model, args, kwargs)
    assert compiled.op_histogram().get("matmul", 0) == 0
    torch.testing.assert_close(
        _last_hidden(compiled(*args, **kwargs)), _last_hidden(model(*args, **kwargs)), atol=1e-4, rtol=1e-4
    )
