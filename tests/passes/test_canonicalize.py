"""canonicalize: respellings that keep every value (issue 21: what stood between real decoders and
the attention patterns)."""

import torch
from torch import nn

import anefx
from helpers import apply, max_abs_diff, ops


class Respelled(nn.Module):
    """Falcon's ``fused[..., [-2], :]`` (a gather of one head) and ``broadcast_to`` of K/V heads over
    their group, a partial rotary's empty pass-through concatenated to the rotated part, and a view
    to the shape a tensor already has."""

    def forward(self, x):
        b, s, c = x.shape
        heads = x.view(b, s, 4, c // 4)
        k = heads[..., [-2], :] + heads[..., [0, 1], :].sum(2, keepdim=True)  # [0, 1]: a run of two
        rot, rest = k[..., :4], k[..., 4:]  # rest: (B, S, 1, 0)
        return torch.broadcast_to(torch.cat([rot * 2, rest], -1).view(b, s, 1, 4), (b, s, 2, 4)) + 1


def test_constant_index_runs_become_slices_and_empty_operands_go():
    model = Respelled().eval()
    cap = anefx.capture(model, (torch.randn(2, 3, 16),))
    before = ops(cap.graph_module)
    assert before["aten.index"] == 2 and before["aten.cat"] == 1, before
    out, rec = apply("canonicalize", cap.graph_module, cap)
    after = ops(out)
    assert "aten.index" not in after and "aten.cat" not in after and after["aten.view"] == 1, after  # the head split
    assert [n.args[1:] for n in out.graph.nodes if n.target == torch.ops.aten.slice.Tensor][:2] == [
        (2, 2, 3, 1),
        (2, 0, 2, 1),
    ]
    assert "aten.broadcast_to" not in after and after["aten.expand"] == 1, after
    assert rec.stats["ops_respelled"] == 3 and rec.stats["identities_removed"] >= 2, rec.stats
    x = torch.randn(2, 3, 16)
    assert max_abs_diff(out, cap, [x]) == 0.0


def test_indices_that_are_no_run_stay_a_gather():
    class Gather(nn.Module):
        def forward(self, x):
            return x[:, [2, 0]] + x[:, [0, 0]]

    cap = anefx.capture(Gather().eval(), (torch.randn(2, 4),))
    out, rec = apply("canonicalize", cap.graph_module, cap)
    assert ops(out)["aten.index"] == 2 and not rec.modified
