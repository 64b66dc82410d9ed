"""attention_chunks: per-head scores above the size limit are computed in query chunks, masks included."""

import pytest
import torch

import anefx
from anefx.analysis.layout import padded_bytes
from anefx.passes.attention_chunks import AttentionChunksOptions, chunk_size
from helpers import apply, example, max_abs_diff, prepare

aten = torch.ops.aten


def _scores(gm):
    return [n for n in gm.graph.nodes if n.target == aten.einsum.default and n.args[0] == "bchq,bkhc->bkhq"]


def _reinit(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.2)
    return model


def test_chunk_size_fits_the_limit_in_whole_rows_and_leaves_small_scores_alone():
    assert chunk_size(1, 100, 100, 2**20) == 100
    size = chunk_size(1, 1025, 1025, 2**20)
    assert size % 32 == 0 and padded_bytes((1, 1025, 1, size)) <= 2**20 < padded_bytes((1, 1025, 1, size + 32))
    assert chunk_size(1, 10**6, 4, 2**20) is None  # one query's scores alone are too large
    assert AttentionChunksOptions().max_bytes == 2**20


def test_long_attention_is_chunked_with_its_padding_mask_and_a_tail():
    cap, gm = prepare("long_attention", "linear_to_conv", "attention_bc1s")
    out, rec = apply("attention_chunks", gm, cap)
    assert rec.modified and not rec.rolled_back
    assert rec.stats == {"chunked_heads": 1, "chunks": 2, "too_large": 0}  # 512 queries + a tail of 488
    widths = [n.meta["val"].shape[3] for n in _scores(out)]
    assert widths == [512, 488]
    vals = [n.meta.get("val") for n in out.graph.nodes]
    assert all(padded_bytes(tuple(v.shape)) <= 2**20 for v in vals if isinstance(v, torch.Tensor) and v.dim() == 4)
    assert max_abs_diff(out, cap) < 1e-5
    # other masks than the example's: every chunk applies its part of the mask
    x, mask = cap.flat_inputs
    for keep in (torch.rand(mask.shape) > 0.5, torch.arange(mask.shape[1]) < 700):
        other = [torch.randn_like(x), keep.long().reshape(mask.shape)]
        assert max_abs_diff(out, cap, other) < 1e-5


def test_causal_mask_is_sliced_with_each_query_chunk():
    model, args, kwargs = example("gpt2", seq=96)
    _reinit(model)
    pipeline = anefx.Pipeline.default().with_options("attention_chunks", max_bytes=96 * 64)  # 32 queries: 64-byte rows
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, convert=False)
    rec = compiled.report.record("attention_chunks")
    assert rec.modified and not rec.rolled_back and rec.stats["chunks"] == 3 * rec.stats["chunked_heads"]
    assert rec.stats["chunked_heads"] == 8  # 2 layers x 4 heads
    ids = torch.randint(0, 1000, args[0].shape)
    mask = torch.ones_like(kwargs["attention_mask"])
    mask[:, -20:] = 0  # padding on top of the causal mask, in the last chunks only
    for m in (kwargs["attention_mask"], mask):
        expected = model(ids, attention_mask=m).last_hidden_state
        torch.testing.assert_close(compiled(ids, attention_mask=m).last_hidden_state, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("image", [256])
def test_vit_at_1025_tokens_compiles_under_the_limit_and_matches_eager(image):
    model, args, kwargs = example("vit", layers=1, dim=32, heads=2, image=image, patch=8)
    _reinit(model)
    compiled = anefx.compile(model, args, kwargs)
    assert compiled.report.record("attention_chunks").stats["chunked_heads"] == 2
    tokens = (image // 8) ** 2 + 1
    assert tokens >= 1024
    sizes = [
        padded_bytes(tuple(int(d) for d in o.shape))
        for op in compiled.artifact.operations()
        if op.op_type != "const"
        for o in op.outputs
    ]
    assert max(sizes) <= AttentionChunksOptions().max_bytes
    other = torch.randn_like(args[0])
    for x in (args[0], other):
        torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, atol=1e-4, rtol=1e-4)
