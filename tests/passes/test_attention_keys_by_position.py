"""Keys stored by position, (B, S, 1, C): the layout Apple's score product ``bchq,bkhc->bkhq`` reads.

An encoder-decoder's cross-attention keys are computed once per input and read at every decode
step; stored this way, the per-head attention reads them with no transpose (the one K transpose of
the rewrite cancels against the transpose that makes them (B, C, 1, S))."""

import torch
from torch import nn

import anefx
from helpers import ops

aten = torch.ops.aten


class CrossAttention(nn.Module):
    """One query token attending to cached keys (B, S, 1, C) and values (B, C, 1, S), masked."""

    def __init__(self, c: int = 32, heads: int = 4):
        super().__init__()
        self.q = nn.Linear(c, c)
        self.heads, self.d = heads, c // heads

    def forward(self, x, keys, values, bias):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        s = keys.shape[1]
        k = keys.reshape(b, s, self.heads, self.d).transpose(1, 2)  # (B, H, S, D) from (B, S, 1, C)
        v = values.reshape(b, self.heads, self.d, s).transpose(2, 3)  # (B, H, S, D) from (B, C, 1, S)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o.transpose(1, 2).reshape(b, t, -1)


def test_keys_by_position_need_no_transpose():
    torch.manual_seed(0)
    model = CrossAttention().eval()
    s = 32
    bias = torch.zeros(1, 1, 1, s)
    bias[..., 20:] = -1e4  # padding slots
    args = (torch.randn(1, 1, 32), torch.randn(1, s, 1, 32), torch.randn(1, 32, 1, s), bias)
    compiled = anefx.compile(model, args, convert=False)
    stats = compiled.report.record("attention_bc1s").stats
    assert stats["rewritten"] == 1 and stats["heads"] == 4 and not stats.get("unmatched")
    keys = compiled.graph_module.graph.find_nodes(op="placeholder")[1]
    for user in keys.users:  # read per head as they are: slices of the last axis, never transposed
        assert user.target in (aten.split.Tensor, aten.slice.Tensor), user.format_node()
        assert user.args[1:] in ((8, 3), (8, -1)) or user.target == aten.slice.Tensor
    assert "aten.einsum" in ops(compiled.graph_module)
    for _ in range(3):  # other keys, values and masks than the example's
        other = (torch.randn(1, 1, 32), torch.randn(1, s, 1, 32), torch.randn(1, 32, 1, s), bias.roll(3, -1))
        torch.testing.assert_close(compiled(*other), model(*other), atol=1e-5, rtol=1e-5)
