import torch

import anefx
from helpers import apply, ops, prepare

aten = torch.ops.aten


def test_modulation_vectors_are_split_on_the_channel_axis():
    cap, gm = prepare("tiny_modulation", "canonicalize")
    out, rec = apply("split_modulation", gm, cap)
    assert rec.modified and not rec.rolled_back and rec.stats["rewritten"] == 1
    counts = ops(out)
    # no (B, 3, C) view left: the projection is split into three (B, C) pieces, the table into rows
    assert not [n for n in out.graph.nodes if n.target == aten.reshape.default and len(n.meta["val"].shape) == 3]
    assert counts["aten.split"] == 1 and counts["aten.unsqueeze"] == 3 and "aten.chunk" not in counts
    x, emb = torch.randn(2, 4, 8) * 2, torch.randn(2, 8) * 3  # inputs the compile never saw
    torch.testing.assert_close(out(x, emb), cap.graph_module(x, emb), atol=1e-5, rtol=1e-5)
    _, again = apply("split_modulation", out, cap)
    assert not again.modified


def test_no_layout_change_left_for_the_modulation_in_ane_form():
    """The block in (B, C, 1, S): the vectors are (B, C, 1, 1) and broadcast on the tokens. (The
    guard keeps this lone block stock: its tokens enter and leave (B, C, 1, S), two transposes
    where stock has one reshape; a DiT's blocks share those two, see tests/test_diffusion.py.)"""
    from examples.models import tiny_modulation

    model, args, _ = tiny_modulation()
    without = anefx.compile(
        model, args, pipeline=anefx.Pipeline.default().without("split_modulation"), never_worse=False
    )
    compiled = anefx.compile(model, args, never_worse=False)
    w, c = without.op_histogram(), compiled.op_histogram()
    # the token stream in and out of (B, C, 1, S); without the pass the (B, 3, C) view is a token
    # sequence of 3 (a reshape of the projection; coremltools folds the transpose into its chunks)
    assert c["transpose"] == 2 and "reshape" not in c and "linear" not in c, c
    assert w["transpose"] == 2 and w["reshape"] == 1, w
    x, emb = torch.randn(2, 4, 8), torch.randn(2, 8)
    torch.testing.assert_close(compiled(x, emb), model(x, emb), atol=1e-5, rtol=1e-5)


def test_other_reshapes_are_left_alone():
    class Heads(torch.nn.Module):  # (B, 3C) viewed as (B, 3, C) and reduced over the 3: no split
        def forward(self, e):
            return e.reshape(e.shape[0], 3, -1).sum(1)

    cap = anefx.capture(Heads(), (torch.randn(2, 12),))
    _, rec = apply("split_modulation", cap.graph_module, cap)
    assert not rec.modified
