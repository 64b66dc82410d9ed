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
