"""Issue 11, item 2: attention masks keep torch's semantics exactly, on masks the compile never saw."""

import math

import pytest
import torch
import torch.nn.functional as F
from mask_cases import keep_masks, keep_masks_4d
from torch import nn

import anefx

FMIN = torch.finfo(torch.float32).min


def _init(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


class MaskedAttention(nn.Module):
    """Multi-head attention over ``ctx`` (S_k) from ``x`` (S_q); ``kind`` picks how the mask is used."""

    def __init__(self, kind, c=16, heads=4, scale_after=None):
        super().__init__()
        self.kind, self.h, self.d, self.scale_after = kind, heads, c // heads, scale_after
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.slope = nn.Parameter(torch.randn(heads))  # a per-head bias linear in the key position (ALiBi-like)

    def split(self, t):
        b, s, _ = t.shape
        return t.view(b, s, self.h, self.d).transpose(1, 2)

    def forward(self, x, ctx, keep):
        q, k, v = self.split(self.q(x)), self.split(self.k(ctx)), self.split(self.v(ctx))
        m = keep if keep.dim() == 4 else keep[:, None, None, :]
        bias = self.slope.view(1, -1, 1, 1) * torch.arange(k.shape[2], dtype=x.dtype)
        kind = self.kind
        if kind == "sdpa_bool":
            o = F.scaled_dot_product_attention(q, k, v, m)
        elif kind == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "sdpa_float_fmin":
            o = F.scaled_dot_product_attention(q, k, v, torch.zeros(m.shape).masked_fill(~m, FMIN))
        else:
            w = q @ k.transpose(-1, -2)
            if kind == "fill_zero":
                w = (w / math.sqrt(self.d)).masked_fill(~m, 0.0)
            elif kind == "fill_small":  # a fill above the mask value: it is a value, not a mask
                w = (w / math.sqrt(self.d)).masked_fill(~m, -3.0)
            elif kind == "fill_ninf":
                w = (w / math.sqrt(self.d)).masked_fill(~m, float("-inf"))
            elif kind == "fill_fmin":
                w = (w / math.sqrt(self.d)).masked_fill(~m, FMIN)
            elif kind == "fill_then_add":  # order matters: the bias is added to the filled values
                w = (w / math.sqrt(self.d)).masked_fill(~m, 0.0) + bias
            elif kind == "add_then_scale":  # (s + bias + mask) * c: the bias and the mask are scaled too
                w = (w + bias + (1.0 - m.float()) * FMIN) * self.scale_after
            elif kind == "fill_then_scale":
                w = w.masked_fill(~m, 2.0) * self.scale_after
            o = torch.softmax(w, dim=-1) @ v
        b, _, s, _ = o.shape
        return o.transpose(1, 2).reshape(b, s, -1)


def _compile(model, args):
    pipeline = anefx.Pipeline.from_names(["linear_to_conv", "attention_bc1s"])
    compiled = anefx.compile(model, args, pipeline=pipeline, convert=False)
    rec = compiled.report.record("attention_bc1s")
    assert rec.modified and not rec.rolled_back, rec.error
    assert rec.stats["rewritten"] == 1 and rec.stats["unmatched"] == 0
    targets = {n.target for n in compiled.graph_module.graph.nodes}
    assert torch.ops.aten.matmul.default not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    return compiled


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


FILL_KINDS = ["sdpa_bool", "sdpa_float_fmin", "fill_zero", "fill_small", "fill_ninf", "fill_fmin", "fill_then_add"]


@pytest.mark.parametrize("kind", FILL_KINDS)
@pytest.mark.parametrize("b,sq,sk", [(1, 6, 6), (2, 5, 9)])
def test_masks_match_eager_on_masks_never_seen(kind, b, sq, sk):
    model = _init(MaskedAttention(kind), 1)
    gen = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(b, sq, 16, generator=gen), torch.randn(b, sk, 16, generator=gen)
    compiled = _compile(model, (x, ctx, torch.ones(b, sk, dtype=torch.bool)))  # compiled without holes
    for name, keep in keep_masks(b, sk, seed=3):
        want, got = model(x, ctx, keep), compiled(x, ctx, keep)
        assert _rel(got, want) < 1e-5, (kind, name)


@pytest.mark.parametrize("kind", ["sdpa_bool", "fill_zero", "fill_ninf", "fill_then_add"])
def test_per_query_masks_match_eager(kind):
    model = _init(MaskedAttention(kind), 4)
    gen = torch.Generator().manual_seed(5)
    b, sq, sk = 2, 5, 7
    x, ctx = torch.randn(b, sq, 16, generator=gen), torch.randn(b, sk, 16, generator=gen)
    compiled = _compile(model, (x, ctx, torch.ones(b, 1, sq, sk, dtype=torch.bool)))
    for name, keep in keep_masks_4d(b, sq, sk, seed=6):
        assert _rel(compiled(x, ctx, keep), model(x, ctx, keep)) < 1e-5, (kind, name)


def test_masked_fill_zero_is_a_value_not_a_mask():
    """Issue 11's case: ``w.masked_fill(~keep, 0.0)`` was lowered to "add -1e4" (rel err 0.45)."""
    model = _init(MaskedAttention("fill_zero"), 7)
    x, ctx = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    compiled = _compile(model, (x, ctx, torch.ones(1, 8, dtype=torch.bool)))
    fills = [n.args[2] for n in compiled.graph_module.graph.nodes if n.target == torch.ops.aten.masked_fill.Scalar]
    assert fills == [0.0] * 4  # one per head, the model's own value
    keep = torch.rand(1, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[0, 0] = True
    assert _rel(compiled(x, ctx, keep), model(x, ctx, keep)) < 1e-5


@pytest.mark.parametrize("b", [1, 2])
def test_causal_sdpa_with_fewer_queries_than_keys_is_top_left(b):
    """torch's ``is_causal`` is ``tril`` over (S_q, S_k): key j is visible to query i iff j <= i."""
    model = _init(MaskedAttention("sdpa_causal"), 8)
    gen = torch.Generator().manual_seed(9)
    x, ctx = torch.randn(b, 16, 16, generator=gen), torch.randn(b, 48, 16, generator=gen)
    keep = torch.ones(b, 48, dtype=torch.bool)  # unused by this model
    compiled = _compile(model, (x, ctx, keep))
    assert not compiled.report.rolled_back
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x2, c2 = torch.randn(b, 16, 16, generator=g), torch.randn(b, 48, 16, generator=g)
        assert _rel(compiled(x2, c2, keep), model(x2, c2, keep)) < 1e-5


def test_causal_sdpa_with_more_queries_than_keys():
    model = _init(MaskedAttention("sdpa_causal"), 10)
    x, ctx, keep = torch.randn(1, 12, 16), torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    compiled = _compile(model, (x, ctx, keep))
    assert _rel(compiled(x, ctx, keep), model(x, ctx, keep)) < 1e-5


@pytest.mark.parametrize("kind", ["add_then_scale", "fill_then_scale"])
@pytest.mark.parametrize("c", [0.125, 3.0])
def test_a_scale_after_a_mask_scales_the_mask(kind, c):
    model = _init(MaskedAttention(kind, scale_after=c), 11)
    gen = torch.Generator().manual_seed(12)
    x, ctx = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 6, 16, generator=gen)
    compiled = _compile(model, (x, ctx, torch.ones(2, 6, dtype=torch.bool)))
    for name, keep in keep_masks(2, 6, seed=13):
        assert _rel(compiled(x, ctx, keep), model(x, ctx, keep)) < 1e-5, name


def _fully_masked_case(kind):
    model = _init(MaskedAttention(kind), 14)
    gen = torch.Generator().manual_seed(15)
    x, ctx = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 6, 16, generator=gen)
    compiled = _compile(model, (x, ctx, torch.ones(2, 6, dtype=torch.bool)))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False  # every key of batch row 1 is masked
    return model(x, ctx, keep), compiled(x, ctx, keep)


@pytest.mark.parametrize("kind", ["sdpa_bool", "fill_fmin", "sdpa_float_fmin", "fill_ninf", "fill_zero"])
def test_fully_masked_rows_are_torchs(kind):
    """SDPA: zeros for bool/-inf masks, uniform weights for finfo.min; eager softmax: NaN for -inf,
    uniform weights for finite fills. anefx gives the same (see anefx.analysis.masks)."""
    want, got = _fully_masked_case(kind)
    assert _rel(got[0], want[0]) < 1e-5  # the unmasked batch row
    if kind == "fill_ninf":
        assert want[1].isnan().all() and got[1].isnan().all()
    else:
        assert not want[1].isnan().any()
        assert float((got[1] - want[1]).abs().max()) < 1e-5 * float(want.abs().max())
    if kind == "sdpa_bool":
        assert not want[1].any()  # zeros
