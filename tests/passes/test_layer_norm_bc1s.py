import pytest
import torch
from torch import nn

import anefx
from helpers import apply, half_copy, max_abs_diff, ops, prepare


def test_layer_norm_over_channels():
    cap, gm = prepare("tiny_block")
    out, rec = apply("layer_norm_bc1s", gm, cap)
    counts = ops(out)
    assert "aten.layer_norm" not in counts and rec.stats["rewritten"] == 1
    norms = [n for n in out.graph.nodes if n.target == torch.ops.anefx.channel_layer_norm.default]
    assert len(norms) == 1 and norms[0].args[0].meta["val"].shape == (1, 8, 1, 4)  # (B, C, 1, S)
    assert "aten.mean" not in counts
    assert max_abs_diff(out, cap) < 1e-5


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-12, 1e-3])
def test_same_eps_and_affine(affine, eps):
    torch.manual_seed(0)
    ln = nn.LayerNorm(16, eps=eps, elementwise_affine=affine)
    if affine:
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    x = torch.randn(2, 7, 16) * 0.01  # small variance: eps matters
    cap = anefx.capture(ln, (x,))
    out, rec = apply("layer_norm_bc1s", cap.graph_module, cap)
    assert rec.modified and not rec.rolled_back
    torch.testing.assert_close(out(x), ln(x), atol=2e-5, rtol=1e-4)


def test_other_layer_norms_are_left_alone():
    ln = nn.LayerNorm([5, 16])  # normalises two axes: no channel-axis form
    cap = anefx.capture(ln, (torch.randn(2, 5, 16),))
    _, rec = apply("layer_norm_bc1s", cap.graph_module, cap)
    assert not rec.modified


def test_fp16_and_idempotence():
    from examples.models import TinyBlock

    model, args = half_copy(TinyBlock().eval(), (torch.randn(1, 4, 8),))
    pipeline = anefx.Pipeline.from_names(["layer_norm_bc1s"])
    compiled = anefx.compile(model, args, pipeline=pipeline, convert=False, never_worse=False)  # the pass alone
    rec = compiled.report.record("layer_norm_bc1s")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-2
    cap = compiled.captured
    _, rec2 = apply("layer_norm_bc1s", compiled.graph_module, cap)
    assert not rec2.modified


class _ViewedNorms(nn.Module):
    """The model's own ``view`` of a LayerNorm's and a linear's output (what a rewrite computes
    through a permute: a view of it raised "Cannot view a tensor with shape …")."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        b, n, c = x.shape
        return self.norm(x).view(b, n * c), self.lin(x).view(b, n * c)


class _QKLayerNorm(nn.Module):
    """Attention with a LayerNorm over head_dim on the queries and keys (SD3's ``qk_norm="layer_norm"``,
    Cohere); ``view_back`` views the normalised heads back instead (no attention)."""

    def __init__(self, c=32, heads=4, view_back=False):
        super().__init__()
        self.heads, self.view_back = heads, view_back
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.norm_q, self.norm_k = nn.LayerNorm(c // heads), nn.LayerNorm(c // heads)

    def forward(self, x):
        b, n, c = x.shape
        q = self.norm_q(self.q(x).view(b, n, self.heads, -1))
        if self.view_back:
            return self.o(q.view(b, n, c))
        k = self.norm_k(self.k(x).view(b, n, self.heads, -1)).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, -1).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, c))


def _reinit(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def test_views_of_rewritten_outputs_and_head_norms_roll_nothing_back():
    for model, x in (
        (_reinit(_ViewedNorms()), torch.randn(2, 8, 16)),
        (_reinit(_QKLayerNorm(view_back=True)), torch.randn(2, 8, 32)),
    ):
        compiled = anefx.compile(model, (x,), convert=False, never_worse=False)
        assert not compiled.report.rolled_back and not [r for r in compiled.report.records if r.excluded_sites]
        x2 = torch.randn_like(x) * 3
        torch.testing.assert_close(compiled(x2), model(x2), atol=1e-5, rtol=1e-5)


def test_a_layer_norm_over_head_dim_is_run_per_head_by_the_attention_pass():
    """``layer_norm_bc1s`` leaves a LayerNorm over head_dim to ``attention_bc1s``, which runs it as one
    ``channel_layer_norm`` per head chunk (it used to take the heads for a channels-last image)."""
    model, x = _reinit(_QKLayerNorm()), torch.randn(2, 8, 32)
    compiled = anefx.compile(model, (x,), convert=False)
    stats = compiled.report.record("attention_bc1s").stats
    assert stats["rewritten"] == 1 and stats["heads"] == 4 and stats["qk_norms"] == 8, stats
    info = compiled.report.guard
    assert info["kept"] == [] and sum(info["anefx"].values()) < sum(info["stock"].values())
    x2 = torch.randn(2, 8, 32) * 3
    torch.testing.assert_close(compiled(x2), model(x2), atol=1e-5, rtol=1e-5)
