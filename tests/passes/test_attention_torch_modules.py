"""Issue 12: PyTorch's own attention modules (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
``nn.TransformerDecoderLayer``) in Apple's per-head form.

``nn.MultiheadAttention`` projects the rows of a sequence-first (S, B, C) tensor with one packed
in-projection and its out-projection reads (S·B, C) rows: attention_bc1s computes both projections on
the (B, C, 1, S) tensor instead. Judged on the MIL program (stock conversion as the bar) and on
numerics with right-padded masks the compile never saw.
"""

import pytest
import torch
from torch import nn

import anefx
from anefx.ir.graph import op_histogram

C, HEADS, SEQ = 32, 4, 8


def _reinit(model: nn.Module) -> nn.Module:
    """Nothing zero or identity: norm weights 1 ± 0.2, every other parameter N(0, 0.3)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _padding(batch: int, pads) -> torch.Tensor:
    """(B, S) keep-mask, 1 on valid tokens, right-padded by ``pads[b]``."""
    return torch.tensor([[1] * (SEQ - p) + [0] * p for p in pads[:batch]])


class Encoder(nn.Module):
    """A stack of ``nn.TransformerEncoderLayer`` called with a key padding mask (boolean or float)."""

    def __init__(self, layers, batch_first=True, float_mask=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(C, HEADS, 2 * C, batch_first=batch_first)
        self.m = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.bf, self.float_mask = batch_first, float_mask

    def forward(self, x, keep):
        pad = ~keep.bool()
        if self.float_mask:
            pad = torch.zeros(pad.shape).masked_fill(pad, -1e9)
        x = x if self.bf else x.transpose(0, 1)  # the user's (S, B, C) tensor
        o = self.m(x, src_key_padding_mask=pad)
        return o if self.bf else o.transpose(0, 1)


def _check(model, compiled, batch=2, pads=((0, 3), (5, 2), (1, 6))):
    """Within 1e-4 relative of eager on the valid tokens, for padding patterns the compile never saw."""
    g = torch.Generator().manual_seed(7)
    for p in pads:
        x, keep = torch.randn(batch, SEQ, C, generator=g), _padding(batch, p)
        with torch.no_grad():
            want = model(x, keep)
        got = compiled(x, keep)
        for b in range(batch):
            n = SEQ - p[b]
            err = float((got[b, :n] - want[b, :n]).abs().max() / want[b, :n].abs().max())
            assert err < 1e-4, (p, b, err)


def test_transformer_encoder_is_per_head_at_depth_2_and_4():
    """The issue's done-when: batch-first ``nn.TransformerEncoder``, eval mode, key padding mask."""
    counts = {}
    for layers in (2, 4):
        model = _reinit(Encoder(layers))
        x, keep = torch.randn(2, SEQ, C), _padding(2, (0, 2))
        compiled = anefx.compile(model, (x, keep))
        rec = compiled.report.record("attention_bc1s")
        assert rec.stats["rewritten"] == layers and rec.stats["unmatched"] == 0, rec.stats
        ops = compiled.op_histogram()
        assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0, ops
        assert ops["einsum"] == 2 * HEADS * layers and ops["softmax"] == HEADS * layers, ops
        assert ops["conv"] == 4 * layers, ops  # in- and out-projection, FFN: no projection twice
        stock = anefx.compile(model, (x, keep), pipeline=anefx.Pipeline.empty(), validate="off").op_histogram()
        moves = ops.get("transpose", 0) + ops.get("reshape", 0)
        assert moves <= stock.get("transpose", 0) + stock.get("reshape", 0), (ops, stock)
        counts[layers] = (ops.get("transpose", 0), ops.get("reshape", 0))
        _check(model, compiled)
    (t2, r2), (t4, r4) = counts[2], counts[4]
    assert t4 - t2 <= 2, counts  # one K transpose per added layer
    assert r4 == r2, counts


@pytest.mark.parametrize("float_mask", [False, True])
def test_encoder_key_padding_mask_is_one_term_per_batch_and_key(float_mask):
    """The key padding mask (boolean, or float with -1e9) reaches the scores as Apple's (B, S_k, 1, 1)
    fill, not as a per-head (B·H, 1, S_k) tensor."""
    model = _reinit(Encoder(2, float_mask=float_mask))
    x, keep = torch.randn(2, SEQ, C), _padding(2, (0, 2))
    compiled = anefx.compile(model, (x, keep), convert=False)
    rec = compiled.report.record("attention_bc1s")
    assert rec.stats["rewritten"] == 2 and rec.stats["unmatched"] == 0, rec.stats
    aten = torch.ops.aten
    fills = [n for n in compiled.graph_module.graph.nodes if n.target == aten.masked_fill.Scalar]
    assert len(fills) == 2 * HEADS, len(fills)
    assert {tuple(n.args[1].meta["val"].shape) for n in fills} == {(2, SEQ, 1, 1)}
    _check(model, compiled)


class MHA(nn.Module):
    """``nn.MultiheadAttention`` as users call it: self-attention (packed in-projection) or
    cross-attention to a memory (``kdim``/``vdim`` other than the embedding: separate weights)."""

    def __init__(self, batch_first, cross=False, attn_mask=None):
        super().__init__()
        kdim = C // 2 if cross else None
        self.m = nn.MultiheadAttention(C, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.bf, self.cross, self.attn_mask = batch_first, cross, attn_mask

    def forward(self, x, keep):
        x = x if self.bf else x.transpose(0, 1)  # the user's (S, B, C) tensor
        mem = x[..., : C // 2] * 2 if self.cross else x  # self-attention: query is key is value
        mask = None
        if self.attn_mask == "causal_bool":
            mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        elif self.attn_mask == "causal_float":
            mask = nn.Transformer.generate_square_subsequent_mask(SEQ)
        o = self.m(x, mem, mem, key_padding_mask=~keep.bool(), attn_mask=mask, need_weights=False)[0]
        return o if self.bf else o.transpose(0, 1)


@pytest.mark.parametrize(
    "batch_first,cross,attn_mask",
    [
        (True, False, None),
        (False, False, None),
        (True, True, None),
        (True, False, "causal_bool"),
        (False, False, "causal_float"),
    ],
)
def test_multihead_attention_is_per_head(batch_first, cross, attn_mask):
    model = _reinit(MHA(batch_first, cross, attn_mask))
    x, keep = torch.randn(2, SEQ, C), _padding(2, (0, 2))
    compiled = anefx.compile(model, (x, keep), convert=False)
    rec = compiled.report.record("attention_bc1s")
    assert rec.stats == {"rewritten": 1, "heads": HEADS, "unmatched": 0, "patterns": {"sdpa": 1}}, rec.stats
    ops = op_histogram(compiled.graph_module)
    assert ops["aten.einsum"] == 2 * HEADS and ops["aten.conv2d"] == (4 if cross else 2), ops
    for op in ("aten.linear", "aten.matmul", "aten.scaled_dot_product_attention", "aten.bmm"):
        assert op not in ops, ops
    _check(model, compiled)


def test_export_does_not_take_the_fast_path():
    """``TransformerEncoderLayer``'s fused kernels (``_transformer_encoder_layer_fwd``,
    ``_native_multi_head_attention``) never reach the captured graph, even with frozen weights under
    ``no_grad`` (the conditions eager inference takes them under)."""
    model = _reinit(Encoder(2)).requires_grad_(False)
    x, keep = torch.randn(2, SEQ, C), _padding(2, (0, 2))
    with torch.no_grad():
        cap = anefx.capture(model, (x, keep))
    targets = {str(n.target) for n in cap.graph_module.graph.nodes}
    assert not any("transformer_encoder_layer" in t or "native_multi_head" in t for t in targets), targets
    assert "aten.scaled_dot_product_attention.default" in targets


class Decoder(nn.Module):
    """``nn.TransformerDecoder``: causal self-attention, then cross-attention to a memory with a
    key padding mask."""

    def __init__(self, layers):
        super().__init__()
        self.m = nn.TransformerDecoder(nn.TransformerDecoderLayer(C, HEADS, 2 * C, batch_first=True), layers)

    def forward(self, x, memory, keep):
        causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
        return self.m(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~keep.bool())


def test_transformer_decoder_self_and_cross_attention_are_per_head():
    model = _reinit(Decoder(2))
    x, mem, keep = torch.randn(2, SEQ, C), torch.randn(2, SEQ, C), _padding(2, (0, 2))
    compiled = anefx.compile(model, (x, mem, keep))
    rec = compiled.report.record("attention_bc1s")
    assert rec.stats == {"rewritten": 4, "heads": 4 * HEADS, "unmatched": 0, "patterns": {"sdpa": 4}}, rec.stats
    ops = compiled.op_histogram()
    assert ops.get("linear", 0) == 0 and ops.get("matmul", 0) == 0 and ops["einsum"] == 4 * 2 * HEADS, ops
    stock = anefx.compile(model, (x, mem, keep), pipeline=anefx.Pipeline.empty(), validate="off").op_histogram()
    assert ops.get("transpose", 0) + ops.get("reshape", 0) <= stock.get("transpose", 0) + stock.get("reshape", 0)
    g = torch.Generator().manual_seed(5)
    for pads in ((0, 3), (5, 1)):
        x2, mem2 = torch.randn(2, SEQ, C, generator=g), torch.randn(2, SEQ, C, generator=g)
        with torch.no_grad():
            want = model(x2, mem2, _padding(2, pads))
        err = float((compiled(x2, mem2, _padding(2, pads)) - want).abs().max() / want.abs().max())
        assert err < 1e-4, (pads, err)  # every query row has a visible memory key: all rows count
