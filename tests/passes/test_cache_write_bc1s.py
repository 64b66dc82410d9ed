"""cache_write_bc1s: what a KV cache write reads, computed per head on the projection's channel
chunks (the catalog's example and its edges)."""

import torch
from torch import nn

import anefx
from examples.models import tiny_cache_write
from helpers import apply, max_abs_diff, ops, prepare

aten = torch.ops.aten


def _tables(seq: int, start: int, base: float = 0.1):
    """cos/sin as transformers lays them out, (1, S, D), for positions ``start .. start + seq``."""
    angles = torch.arange(start, start + seq).float()[:, None] * torch.tensor([1.0, base])
    angles = torch.cat([angles, angles], -1)[None]
    return angles.cos(), angles.sin()


def test_rotary_keys_are_merged_without_a_layout_change():
    cap, gm = prepare("tiny_cache_write", "linear_to_conv")
    before = ops(gm)
    # the model's head split of the projection reads it through linear_to_conv's permute: a reshape
    assert (before["aten.transpose"], before["aten.reshape"], before["aten.view"]) == (2, 2, 1), before
    out, rec = apply("cache_write_bc1s", gm, cap)
    assert rec.stats == {"merges": 1} and rec.modified and not rec.rolled_back, rec
    after = ops(out)
    # no head split, no merge: chunks of the projection's channels (the view left is the weight's, 1x1)
    assert "aten.transpose" not in after and "aten.reshape" not in after and after["aten.view"] == 1, after
    (merge,) = out.graph.output_node().args[0]
    assert merge.target == aten.cat.default and merge.args[1] == 1 and len(merge.args[0]) == 2  # one chunk per head
    assert all(p.meta["val"].shape == (1, 4, 1, 4) for p in merge.args[0])
    model, _, _ = tiny_cache_write()
    for start, base in ((7, 0.1), (100, 0.01)):  # other tokens, positions and frequencies than the compile's
        x, (cos, sin) = torch.randn(1, 4, 8), _tables(4, start, base)
        with torch.no_grad():
            torch.testing.assert_close(out(x, cos, sin), model(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_a_second_run_changes_nothing():
    cap, gm = prepare("tiny_cache_write", "linear_to_conv", "cache_write_bc1s")
    _, rec = apply("cache_write_bc1s", gm, cap)
    assert not rec.modified and rec.stats == {"merges": 0}, rec.stats


class Writes(nn.Module):
    """Three channels-first merges: of V heads (plain channel blocks of the projection), of an
    attention output (not a projection's heads: left alone), and of V heads merged the other way
    (channel ``d·H + h``: no cache layout, left alone)."""

    def __init__(self, c=16, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.d = heads, c // heads
        self.v = nn.Linear(c, c)

    def forward(self, x):
        b, s, c = x.shape
        v = self.v(x).view(b, s, self.h, self.d).transpose(1, 2)  # (B, H, S, D)
        o = (v @ v.transpose(-1, -2)).softmax(-1) @ v
        return (
            v.transpose(2, 3).reshape(b, c, 1, s),
            o.transpose(2, 3).reshape(b, c, 1, s),
            v.permute(0, 3, 1, 2).reshape(b, c, 1, s),
        )


def test_only_a_projections_heads_merged_channels_first_are_rewritten():
    cap = anefx.capture(Writes().eval(), (torch.randn(2, 5, 16),))
    gm = anefx.Pipeline.from_names(["linear_to_conv"]).run(cap.graph_module, cap.flat_inputs).graph_module
    out, rec = apply("cache_write_bc1s", gm, cap)
    assert rec.stats == {"merges": 1} and not rec.rolled_back, rec.stats
    v_write, o_write, other_order = out.graph.output_node().args[0]
    assert v_write.target == aten.conv2d.default  # the projection itself: its channels are h·D + d already
    assert o_write.target == aten.reshape.default and other_order.target == aten.reshape.default
    assert max_abs_diff(out, cap, [torch.randn(2, 5, 16)]) < 1e-6
