"""anefx.compile end to end: the core path's done-when."""

import coremltools as ct
import pytest
import torch

import anefx
from helpers import example


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check(compiled, model, args, kwargs, tmp_path, name, atol=1e-4):
    out = compiled(*args, **kwargs)
    ref = model(*args, **kwargs)
    ref = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    assert [r.name for r in compiled.report.records] == anefx.Pipeline.default().names
    assert not compiled.report.rolled_back, [r.error for r in compiled.report.rolled_back]
    path = compiled.save(tmp_path / f"{name}.mlpackage")
    spec = ct.utils.load_spec(str(path))
    assert spec.WhichOneof("Type") == "mlProgram"
    return spec


@pytest.mark.parametrize("name", ["mlp", "nin", "block_stack"])
def test_small_models(name, tmp_path):
    model, args, kwargs = example(name)
    before = _state(model)
    compiled = anefx.compile(model, args, kwargs)
    _check(compiled, model, args, kwargs, tmp_path, name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_small_distilbert_with_padding(attn, tmp_path):
    model, args, kwargs = example("distilbert_small", attn=attn, pad=5)
    compiled = anefx.compile(model, args, kwargs)
    spec = _check(compiled, model, args, kwargs, tmp_path, "distilbert")
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in spec.description.output] == ["last_hidden_state"]
    # the returned structure is the model's own (a BaseModelOutput)
    assert type(compiled(*args, **kwargs)).__name__ == "BaseModelOutput"


# the full-size DistilBERT (the core path's reference model): tests/test_transformers_structure.py


def test_report_prints_a_table():
    model, args, _ = example("mlp")
    text = str(anefx.compile(model, args).report)
    for name in anefx.Pipeline.default().names:
        assert name in text
    assert "max abs err" in text and "target=coreml" in text


def test_convert_false_has_no_artifact():
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args, convert=False)
    with pytest.raises(AttributeError, match="convert=False"):
        compiled.save("x.mlpackage")
