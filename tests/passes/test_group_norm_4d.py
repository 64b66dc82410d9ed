import pytest
import torch
from torch import nn

import anefx
from helpers import apply, half_copy, ops, prepare


def test_group_norm_becomes_one_instance_norm_on_a_view_keeping_the_last_axis():
    cap, gm = prepare("tiny_group_norm")
    out, rec = apply("group_norm_4d", gm, cap)
    assert rec.modified and not rec.rolled_back and rec.stats["rewritten"] == 1
    counts = ops(out)
    assert "aten.group_norm" not in counts and counts["anefx.instance_norm_4d"] == 1
    (norm,) = [n for n in out.graph.nodes if n.target == torch.ops.anefx.instance_norm_4d.default]
    assert tuple(norm.args[0].meta["val"].shape) == (1, 2, 16, 4)  # (B, G, C/G·H, W): W kept
    x = torch.randn(1, 8, 4, 4) * 5 + 2  # an input the compile never saw
    torch.testing.assert_close(out(x), cap.graph_module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (2, 12, 9)])  # images, and (B, C, L) for 1-D convs
def test_same_numerics_on_images_and_sequences(affine, shape):
    torch.manual_seed(0)
    gn = nn.GroupNorm(3, 12, eps=1e-3, affine=affine)
    if affine:
        nn.init.normal_(gn.weight, 1.0, 0.3)
        nn.init.normal_(gn.bias)
    cap = anefx.capture(gn.eval(), (torch.randn(*shape),))
    out, rec = apply("group_norm_4d", cap.graph_module, cap)
    assert rec.modified and not rec.rolled_back
    x = torch.randn(*shape) * 0.01  # small variance: eps matters
    torch.testing.assert_close(out(x), gn(x), atol=1e-5, rtol=1e-4)


def test_converts_to_instance_norm_with_no_rank_5_tensor():
    """coremltools' own lowering: a rank-5 view and nine ops per GroupNorm; anefx's: one 4-D
    instance_norm between two reshapes that keep the last axis (and the affine)."""
    from examples.models import tiny_group_norm

    model, args, _ = tiny_group_norm()
    stock = anefx.compile(model, args, pipeline=anefx.Pipeline.empty(), validate="off").artifact
    ours = anefx.compile(model, args, pipeline=anefx.Pipeline.from_names(["group_norm_4d"])).artifact
    s, o = stock.op_histogram(), ours.op_histogram()
    assert o["instance_norm"] == 1 and "reduce_mean" not in o and s["reduce_mean"] == 2, (s, o)
    assert o["reshape"] == s["reshape"] == 2 and sum(o.values()) < sum(s.values()) - 4, (s, o)
    ranks = [len(v.shape) for op in ours.operations() for v in op.outputs if op.op_type != "const"]
    assert max(ranks) == 4 and 5 in [len(v.shape) for op in stock.operations() for v in op.outputs]


def test_fp16_and_idempotence():
    from examples.models import tiny_group_norm

    model, args, _ = tiny_group_norm()
    model, args = half_copy(model, args)
    pipeline = anefx.Pipeline.from_names(["group_norm_4d"])
    compiled = anefx.compile(model, args, pipeline=pipeline, convert=False, never_worse=False)
    rec = compiled.report.record("group_norm_4d")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-2
    _, rec2 = apply("group_norm_4d", compiled.graph_module, compiled.captured)
    assert not rec2.modified
