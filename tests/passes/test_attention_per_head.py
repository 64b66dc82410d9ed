"""Per-head work between the head split and attention, judged on small hand-written modules:
QK-norm spellings (before or after the head transpose, with or without a weight, ``F.rms_norm``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anefx
from helpers import max_abs_diff, ops, reads_projection

aten = torch.ops.aten


def _run(model, args, passes=("linear_to_conv", "attention_bc1s")):
    cap = anefx.capture(model, args)
    res = anefx.Pipeline.from_names(list(passes)).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    rec = res.records[-1]
    assert not rec.rolled_back, rec.error
    return cap, res.graph_module, rec


def _reinit(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


class QKNorm(nn.Module):
    """RMSNorm over head_dim on q and k, in the spelling ``kind`` picks."""

    def __init__(self, kind, c=32, heads=4):
        super().__init__()
        self.kind, self.h, self.d = kind, heads, c // heads
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.q_norm = nn.Parameter(torch.ones(self.d))
        self.k_norm = nn.Parameter(torch.ones(self.d))

    def norm(self, t, w):
        if self.kind == "f_rms_norm":
            return F.rms_norm(t, (self.d,), w, 1e-6)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
        return t if self.kind == "no_weight" else w * t

    def forward(self, x, mask):
        b, s, c = x.shape
        q, k, v = (p(x).view(b, s, self.h, self.d) for p in (self.q, self.k, self.v))
        if self.kind == "after_transpose":
            q, k = self.norm(q.transpose(1, 2), self.q_norm), self.norm(k.transpose(1, 2), self.k_norm)
        else:
            q, k = self.norm(q, self.q_norm).transpose(1, 2), self.norm(k, self.k_norm).transpose(1, 2)
        v = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, mask[:, None, None, :].bool())
        return o.transpose(1, 2).reshape(b, s, c)


@pytest.mark.parametrize("kind", ["before_transpose", "after_transpose", "no_weight", "f_rms_norm"])
def test_qk_norm_is_one_channel_layer_norm_per_head(kind):
    model = _reinit(QKNorm(kind))
    x, mask = torch.randn(1, 6, 32), torch.tensor([[1, 1, 1, 1, 0, 0]])
    cap, gm, rec = _run(model, (x, mask))
    assert rec.stats["rewritten"] == 1 and rec.stats["qk_norms"] == 8, rec.stats
    counts = ops(gm)
    assert counts["anefx.channel_layer_norm"] == 8, counts
    for op in ("aten.mean", "aten.rsqrt", "aten.pow", "aten.rms_norm"):
        assert op not in counts, (op, counts)
    assert max_abs_diff(gm, cap) < 1e-5
    other = [torch.randn(1, 6, 32), torch.tensor([[1, 1, 0, 0, 0, 0]])]
    assert max_abs_diff(gm, cap, other) < 1e-5


class Interleaved(nn.Module):
    """Interleaved rotary written by hand (``x[..., ::2]``/``x[..., 1::2]`` stacked back), cos/sin
    computed from positions, optionally a fused QKV projection or a QK-norm before the rotary."""

    def __init__(self, fused=False, qk_norm=False, c=32, heads=4):
        super().__init__()
        self.fused, self.qk_norm, self.h, self.d = fused, qk_norm, heads, c // heads
        if fused:
            self.qkv = nn.Linear(c, 3 * c)
        else:
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.norm = nn.Parameter(torch.ones(self.d))
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, self.d, 2).float() / self.d))

    @staticmethod
    def rotate(x, cos, sin):
        rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rot * sin

    def forward(self, x, mask):
        b, s, c = x.shape
        qkv = self.qkv(x).chunk(3, -1) if self.fused else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(b, s, self.h, self.d).transpose(1, 2) for t in qkv)
        if self.qk_norm:
            q, k = (self.norm * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)) for t in (q, k))
        freqs = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos = freqs.cos().repeat_interleave(2, -1)
        sin = freqs.sin().repeat_interleave(2, -1)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, mask[:, None, None, :].bool())
        return o.transpose(1, 2).reshape(b, s, c)


@pytest.mark.parametrize("variant", ["separate", "fused", "qk_norm"])
def test_interleaved_rotary_is_rewritten_per_head(variant):
    """Separate projections get their weight rows permuted (evens first in each head), so the
    rotary needs no strided slice of a head; a fused QKV projection keeps its weight and reorders
    the rotated channels back per head instead. Equal to eager on inputs the compile never saw."""
    model = _reinit(Interleaved(fused=variant == "fused", qk_norm=variant == "qk_norm"))
    x, mask = torch.randn(1, 6, 32), torch.tensor([[1, 1, 1, 1, 0, 0]])
    cap, gm, rec = _run(model, (x, mask))
    assert rec.stats["rewritten"] == 1 and rec.stats["heads"] == 4, rec.stats
    counts = ops(gm)
    assert "aten.stack" not in counts and "aten.scaled_dot_product_attention" not in counts, counts
    strided = [n for n in gm.graph.nodes if n.target == aten.slice.Tensor and len(n.args) > 4 and n.args[4] != 1]
    on_heads = [n for n in strided if reads_projection(n.args[0])]  # not the cos/sin tables
    if variant == "fused":
        assert "reordered_heads" not in rec.stats and on_heads, rec.stats
    else:
        assert rec.stats["reordered_heads"] == 4, rec.stats
        assert counts["aten.conv2d"] == 3 and not on_heads, (counts, strided)
    if variant == "qk_norm":
        assert rec.stats["qk_norms"] == 8 and counts["anefx.channel_layer_norm"] == 8, counts
    assert max_abs_diff(gm, cap) < 1e-5
    other = [torch.randn(1, 6, 32), torch.tensor([[1, 1, 0, 0, 0, 0]])]
    assert max_abs_diff(gm, cap, other) < 1e-5


class Alibi(nn.Module):
    """ALiBi: a per-head linear distance bias added to the scores (slopes 2^(-8i/H)), padding filled."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.h, self.d = heads, c // heads
        self.qkv = nn.Linear(c, 3 * c)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)]))

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        pos = torch.arange(n)
        bias = self.slopes[None, :, None, None] * (pos[None, :] - pos[:, None]).float()[None, None]
        w = q @ k.transpose(-1, -2) / self.d**0.5 + bias
        w = w.masked_fill(~mask[:, None, None, :].bool(), -1e9)
        return (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def test_alibi_bias_is_carried_per_head():
    model = _reinit(Alibi())
    x, mask = torch.randn(1, 8, 32), torch.tensor([[1] * 8])
    cap, gm, rec = _run(model, (x, mask))
    assert rec.stats == {"rewritten": 1, "heads": 4, "unmatched": 0, "patterns": {"matmul": 1}}, rec.stats
    assert ops(gm)["aten.einsum"] == 8
    for pad in (0, 3):
        m = torch.tensor([[1] * (8 - pad) + [0] * pad])
        assert max_abs_diff(gm, cap, [torch.randn(1, 8, 32), m]) < 1e-5


class TorchMHA(nn.Module):
    """PyTorch's own attention modules, batch-first or sequence-first, with a key padding mask."""

    def __init__(self, kind, batch_first):
        super().__init__()
        self.kind, self.bf = kind, batch_first
        if kind == "mha":
            self.m = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        else:
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first)
            self.m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, mask):
        x = x if self.bf else x.transpose(0, 1)  # (S, B, C) when sequence-first
        pad = ~mask.bool()
        if self.kind == "mha":
            o = self.m(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        else:
            o = self.m(x, src_key_padding_mask=pad)
        return o if self.bf else o.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["mha", "encoder"])
def test_torch_attention_modules_are_per_head_and_exact(kind, batch_first):
    """nn.MultiheadAttention projects the rows of a sequence-first tensor (or (S·B, C) rows) with one
    packed in-projection: the projections are computed on the (B, C, 1, S) tensor instead (also on a
    sequence-first residual stream, transposed once per layer), and every layer becomes per head."""
    model = _reinit(TorchMHA(kind, batch_first))
    x, mask = torch.randn(2, 8, 32), torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    compiled = anefx.compile(model, (x, mask), convert=False)
    rec = compiled.report.record("attention_bc1s")
    layers = 1 if kind == "mha" else 2
    assert rec.stats == {"rewritten": layers, "heads": 4 * layers, "unmatched": 0, "patterns": {"sdpa": layers}}, (
        rec.stats
    )
    counts = ops(compiled.graph_module)
    assert counts["aten.conv2d"] == (2 if kind == "mha" else 4 * layers), counts
    assert "aten.linear" not in counts and "aten.scaled_dot_product_attention" not in counts, counts
    x2, mask2 = torch.randn(2, 8, 32), torch.tensor([[1] * 5 + [0] * 3, [1] * 7 + [0]])
    with torch.no_grad():
        want = model(x2, mask2)
    got = compiled(x2, mask2)
    assert float((got - want)[0, :5].abs().max()) < 1e-5 and float((got - want)[1, :7].abs().max()) < 1e-5


class CastSoftcap(nn.Module):
    """Soft-capped scores whose softmax is upcast and cast back before the value product."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, 4, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        w = torch.tanh(q @ k.transpose(-1, -2) / 8.0) * 8.0
        w = torch.softmax(w, -1, dtype=torch.float64).to(torch.float32)
        return (w @ v).transpose(1, 2).reshape(b, n, c)


def test_soft_capping_behind_a_cast_is_per_head():
    """tanh soft-capping between QK^T and a softmax upcast to float64 and cast back: the cap is
    element-wise, so each head's score einsum gets its own tanh; the softmax runs in float32."""
    model = _reinit(CastSoftcap())
    compiled = anefx.compile(model, (torch.randn(1, 5, 16),), convert=False)
    rec = compiled.report.record("attention_bc1s")
    assert rec.stats == {"rewritten": 1, "heads": 4, "unmatched": 0, "patterns": {"matmul": 1}}, rec.stats
    counts = ops(compiled.graph_module)
    assert counts["aten.tanh"] == 4 and counts["aten._softmax"] == 4 and "aten.matmul" not in counts, counts
    x2 = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert float((compiled(x2) - model(x2)).abs().max()) < 1e-5
