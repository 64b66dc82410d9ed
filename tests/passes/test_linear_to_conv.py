import pytest
import torch
from torch import nn

import anefx
from helpers import apply, half_copy, max_abs_diff, ops, prepare

aten = torch.ops.aten


def _capture(model, *args):
    cap = anefx.capture(model.eval(), args)
    return cap, cap.graph_module


def test_linear_becomes_conv_with_weight_view():
    cap, gm = prepare("tiny_block")
    out, rec = apply("linear_to_conv", gm, cap)
    counts = ops(out)
    assert "aten.linear" not in counts and counts["aten.conv2d"] == 2
    assert rec.stats["converted"] == 2 and not rec.rolled_back
    for conv in (n for n in out.graph.nodes if n.target == aten.conv2d.default):
        w = conv.args[1]
        assert w.target == aten.view.default and w.args[0].op == "get_attr"  # a view: no copy
        assert list(w.args[1])[2:] == [1, 1]
        assert conv.meta["val"].shape[2] == 1  # (B, C, 1, S)
    assert max_abs_diff(out, cap) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_b_i_mlp(bias):
    cap, gm = prepare("mlp", factory_kwargs={"bias": bias})
    out, _ = apply("linear_to_conv", gm, cap)
    convs = [n for n in out.graph.nodes if n.target == aten.conv2d.default]
    assert len(convs) == 2 and (convs[0].args[2] is not None) == bias
    assert list(convs[0].meta["val"].shape) == [4, 128, 1, 1]  # (B, I) -> (B, O, 1, 1)
    assert max_abs_diff(out, cap) < 1e-5


class Disguised(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w_io = nn.Parameter(torch.randn(8, 12))
        self.w_oi = nn.Parameter(torch.randn(6, 12))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x, x2):
        a = torch.matmul(x, self.w_io)  # (B, S, 12)
        c = torch.einsum("bsi,oi->bso", a, self.w_oi)
        d = torch.einsum("bsi,io->bso", x, self.w_io)
        e = torch.addmm(self.b, x2, self.w_oi.T)  # (B, I) case
        f = x2 @ self.w_oi.t()
        return c, d, e, f


def test_linears_in_disguise():
    model = Disguised()
    cap, gm = _capture(model, torch.randn(2, 5, 8), torch.randn(3, 12))
    out, rec = apply("linear_to_conv", gm, cap)
    counts = ops(out)
    assert rec.stats["converted"] == 5, counts
    for op in ("aten.matmul", "aten.einsum", "aten.addmm", "aten.mm", "aten.linear"):
        assert op not in counts, counts
    assert counts["aten.conv2d"] == 5
    assert max_abs_diff(out, cap) < 1e-4


def test_activation_products_and_other_ranks_are_left_alone():
    class NotProjections(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, q, k, img):
            return q @ k.transpose(-1, -2), self.fc(img)  # activation @ activation; a rank-5 linear

    cap, gm = _capture(NotProjections(), torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 2, 3, 2, 4))
    out, rec = apply("linear_to_conv", gm, cap)
    assert not rec.modified and rec.stats == {"converted": 0, "skipped_rank": 1}
    assert ops(out)["aten.matmul"] == 1


def test_min_channels_option_and_idempotence():
    cap, gm = prepare("tiny_block")
    out, rec = apply("linear_to_conv", gm, cap, min_channels=10)  # fc1 has 8 inputs, fc2 16
    assert rec.stats["converted"] == 1 and rec.stats["skipped_min_channels"] == 1
    out, _ = apply("linear_to_conv", gm, cap)
    _, rec2 = apply("linear_to_conv", out, cap)
    assert not rec2.modified


def test_fp16_numerics():
    from examples.models import TinyBlock

    model, args = half_copy(TinyBlock().eval(), (torch.randn(1, 4, 8),))
    pipeline = anefx.Pipeline.from_names(["linear_to_conv"])
    compiled = anefx.compile(model, args, pipeline=pipeline, convert=False, never_worse=False)  # the pass alone
    rec = compiled.report.record("linear_to_conv")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-2
    assert compiled.graph_module(*args).dtype == torch.float16


def test_channels_last_image_linear_becomes_conv():
    """ConvNeXt-style: a Linear on (B, H, W, C) is a 1x1 conv on (B, C, H, W)."""
    fc = nn.Linear(8, 6).eval()
    x = torch.randn(1, 5, 7, 8)
    cap = anefx.capture(fc, (x,))
    out, rec = apply("linear_to_conv", cap.graph_module, cap)
    conv = next(n for n in out.graph.nodes if n.target == aten.conv2d.default)
    assert rec.stats["converted"] == 1 and list(conv.meta["val"].shape) == [1, 6, 5, 7]
    assert max_abs_diff(out, cap) < 1e-5
