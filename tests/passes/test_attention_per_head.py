"""Per-head work between the head split and attention, judged on small hand-written modules:
QK-norm spellings (before or after the head transpose, with or without a weight, ``F.rms_norm``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anefx
from helpers import max_abs_diff, ops

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
