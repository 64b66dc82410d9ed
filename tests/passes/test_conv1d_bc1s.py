import pytest
import torch
from torch import nn

import anefx
from helpers import apply, max_abs_diff, ops, prepare

aten = torch.ops.aten


def test_stem_becomes_conv2d_over_bc1s():
    cap, gm = prepare("conv_stem")
    out, rec = apply("conv1d_bc1s", gm, cap)
    counts = ops(out)
    assert "aten.conv1d" not in counts and counts["aten.conv2d"] == 2 and rec.stats["rewritten"] == 2
    for node in out.graph.find_nodes(op="call_function", target=aten.conv2d.default):
        x, w = node.args[0].meta["val"], node.args[1]
        assert x.dim() == 4 and x.shape[2] == 1  # (B, C, 1, T)
        assert tuple(w.meta["val"].shape[2:]) == (1, 3)  # the same weights, height 1
    assert max_abs_diff(out, cap) < 1e-6


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=5, stride=3, padding=2, dilation=2),
        dict(kernel_size=3, groups=8, bias=False),  # depthwise (Conformer)
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=1),
    ],
    ids=["strided-dilated", "depthwise", "same", "reflect", "pointwise"],
)
def test_every_spelling_is_exact(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 8, **conv), nn.GELU()).eval()
    x = torch.randn(2, 8, 23)
    cap = anefx.capture(model, (x,))
    out, rec = apply("conv1d_bc1s", cap.graph_module, cap)
    assert rec.modified and not rec.rolled_back and "aten.conv1d" not in ops(out)
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
    _, again = apply("conv1d_bc1s", out, cap)
    assert not again.modified  # idempotent


def test_left_alone():
    torch.manual_seed(0)
    unbatched = nn.Conv1d(4, 4, 3).eval()  # (C, T): no batch axis to put the unit height after
    cap = anefx.capture(unbatched, (torch.randn(4, 9),))
    _, rec = apply("conv1d_bc1s", cap.graph_module, cap)
    assert not rec.modified
    cap, gm = prepare("tiny_block")
    _, rec = apply("conv1d_bc1s", gm, cap)
    assert not rec.modified


def test_default_pipeline_keeps_the_stem_in_bc1s():
    """With the layout passes after it, the stem runs in (B, C, 1, T) from the input's free unsqueeze
    to the (B, T, C) sequence it returns: the only layout changes left are at the model's edges."""
    from examples.models import conv_stem

    model, args, _ = conv_stem()
    compiled = anefx.compile(model, args, convert=False)
    counts = ops(compiled.graph_module)
    assert "aten.conv1d" not in counts and counts["aten.conv2d"] == 2
    # in: the input's unsqueeze; out: squeeze + permute to the (B, T, C) the model returns; nothing between
    assert counts["aten.unsqueeze"] == 1 and counts["aten.squeeze"] == 1 and counts["aten.permute"] == 1
    assert "aten.transpose" not in counts
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
