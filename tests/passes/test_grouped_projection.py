import torch
from torch import nn

import anefx
from helpers import apply, max_abs_diff, ops, prepare

aten = torch.ops.aten


def test_block_diagonal_projection_becomes_one_grouped_conv():
    cap, gm = prepare("grouped_projection")
    out, rec = apply("grouped_projection", gm, cap)
    convs = [n for n in out.graph.nodes if n.target == aten.conv2d.default]
    assert rec.stats["fused"] == 1 and len(convs) == 1 and convs[0].args[6] == 4
    assert "aten.linear" not in ops(out) and "aten.cat" not in {n for n in ops(out) if "view" in n}
    assert list(convs[0].meta["val"].shape) == [1, 64, 1, 16]
    assert max_abs_diff(out, cap) < 1e-5
    _, again = apply("grouped_projection", out, cap)
    assert not again.modified


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.ModuleList(nn.Linear(4, 6, bias=False) for _ in range(3))

    def forward(self, x):
        return torch.cat([p(c) for p, c in zip(self.p, x.split(4, dim=-1))], dim=-1)


def test_without_bias_and_with_split():
    cap = anefx.capture(NoBias().eval(), (torch.randn(2, 5, 12),))
    out, rec = apply("grouped_projection", cap.graph_module, cap)
    conv = next(n for n in out.graph.nodes if n.target == aten.conv2d.default)
    assert rec.modified and conv.args[2] is None and conv.args[6] == 3
    assert max_abs_diff(out, cap) < 1e-5


class Unequal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        p, q = x.split([4, 8], dim=-1)
        return torch.cat([self.a(p), self.b(q)], dim=-1), torch.cat([self.a(x[..., :4]), x[..., 4:8]], dim=-1)


def test_unequal_groups_are_not_fused():
    cap = anefx.capture(Unequal().eval(), (torch.randn(1, 3, 12),))
    _, rec = apply("grouped_projection", cap.graph_module, cap)
    assert not rec.modified


def test_existing_grouped_conv_is_untouched():
    compiled = anefx.compile(*_nin())
    convs = [n for n in compiled.graph_module.graph.nodes if n.target == aten.conv2d.default]
    assert [c.args[6] if len(c.args) > 6 else 1 for c in convs] == [1, 1, 4, 1]
    assert not any(r.modified for r in compiled.report.records)


def _nin():
    from examples.models import nin

    model, args, _ = nin()
    return model, args
