import torch
from torch import nn

import anefx
from helpers import apply, ops, prepare


def test_batch_norm_over_flattened_tokens_becomes_an_affine_on_the_tokens():
    cap, gm = prepare("tiny_token_batch_norm")
    out, rec = apply("token_batch_norm", gm, cap)
    assert rec.modified and not rec.rolled_back and rec.stats["rewritten"] == 1
    counts = ops(out)
    assert "aten.batch_norm" not in counts and "aten.flatten" not in counts and "aten.reshape_as" not in counts
    x = torch.randn(2, 4, 8) * 3 + 1  # an input the compile never saw
    torch.testing.assert_close(out(x), cap.graph_module(x), atol=1e-5, rtol=1e-5)
    _, again = apply("token_batch_norm", out, cap)
    assert not again.modified


def test_the_tokens_stay_in_ane_form_and_the_norm_folds_into_the_conv():
    from examples.models import tiny_token_batch_norm

    model, args, _ = tiny_token_batch_norm()
    raw = anefx.compile(model, args, never_worse=False)
    without = anefx.compile(
        model, args, pipeline=anefx.Pipeline.default().without("token_batch_norm"), never_worse=False
    )
    r, w = raw.op_histogram(), without.op_histogram()
    # a transpose in and one out of (B, C, 1, S); without the pass the flatten/reshape pair also
    # takes the projection's output out of it and back
    assert r["transpose"] == 2 and "reshape" not in r and "batch_norm" not in r and r["conv"] == 1, r
    assert w["transpose"] + w.get("reshape", 0) > 2, w
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(raw(x), model(x), atol=1e-5, rtol=1e-5)


def test_image_batch_norms_are_left_alone():
    class Image(nn.Module):  # BatchNorm2d on an image: already per channel on axis 1
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(x)

    cap = anefx.capture(Image().eval(), (torch.randn(1, 4, 3, 3),))
    _, rec = apply("token_batch_norm", cap.graph_module, cap)
    assert not rec.modified
