import pytest
import torch
from torch import nn

import anefx
from anefx.passes.to_bc1s import count_layout_changes
from helpers import apply, max_abs_diff, ops, prepare


def test_layout_changes_shrink_to_one_in_one_out():
    cap, gm = prepare("tiny_block", "linear_to_conv", "layer_norm_bc1s")
    assert count_layout_changes(gm.graph) == 6
    out, rec = apply("to_bc1s", gm, cap)
    assert count_layout_changes(out.graph) == 2
    assert rec.stats["layout_changes_before"] == 6 and rec.stats["layout_changes_after"] == 2
    gelu = next(n for n in out.graph.nodes if n.target == torch.ops.aten.gelu.default)
    assert list(gelu.meta["val"].shape) == [1, 16, 1, 4]  # gelu now runs in (B, C, 1, S)
    assert max_abs_diff(out, cap) < 1e-5
    _, again = apply("to_bc1s", out, cap)
    assert not again.modified


@pytest.mark.parametrize("n", [1, 3, 12])
def test_changes_do_not_grow_with_depth(n):
    cap, gm = prepare("block_stack", "linear_to_conv", "layer_norm_bc1s", factory_kwargs={"n": n})
    out, _ = apply("to_bc1s", gm, cap)
    assert count_layout_changes(out.graph) == 2


def test_without_anchors_nothing_changes():
    cap, gm = prepare("tiny_block")  # no layout change yet: nothing would benefit from moving
    _, rec = apply("to_bc1s", gm, cap)
    assert not rec.modified


class Mixer(nn.Module):
    """Softmax, reductions, concat, split, slice and a (B, C) head between projections."""

    def __init__(self, c=8):
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = self.fc1(x)
        z = torch.softmax(y, dim=-1) * y
        z = z - z.mean(dim=-1, keepdim=True)
        c = torch.cat([z, y], dim=-1)
        a, b = c.split([16, 16], dim=-1)
        h = self.fc2(a + b)
        h = h[:, 1:] * 0.5  # slice on the sequence axis
        pooled = h.mean(dim=1)  # (B, C)
        return self.head(torch.relu(pooled))


def test_layout_agnostic_ops_follow_the_layout():
    torch.manual_seed(0)
    cap = anefx.capture(Mixer().eval(), (torch.randn(2, 6, 8),))
    res = anefx.Pipeline.from_names(["linear_to_conv", "to_bc1s"]).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    gm = res.graph_module
    assert not any(r.rolled_back for r in res.records), [r.error for r in res.records]
    assert count_layout_changes(gm.graph) == 2  # the input in, the (B, 3) logits out

    def rank(n):
        v = n.meta["val"]
        return (v[0] if isinstance(v, (list, tuple)) else v).dim()

    four_d = {n.target for n in gm.graph.nodes if n.op == "call_function" and rank(n) == 4}
    aten = torch.ops.aten
    for op in (aten.softmax.int, aten.cat.default, aten.split_with_sizes.default, aten.slice.Tensor):
        assert op in four_d, op
    assert max_abs_diff(gm, cap) < 1e-5


class Fork(nn.Module):
    """Two outputs that both need the original layout: 1 change in + 2 out is the minimum."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return h, self.fc2(h) + x


def test_min_cut_is_optimal_on_a_fork():
    cap = anefx.capture(Fork().eval(), (torch.randn(1, 5, 8),))
    res = anefx.Pipeline.from_names(["linear_to_conv", "to_bc1s"]).run(cap.graph_module, cap.flat_inputs)
    assert ops(res.graph_module)["aten.permute"] == 3
    assert max_abs_diff(res.graph_module, cap) < 1e-5
