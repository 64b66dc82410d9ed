import torch
from torch import nn

import anefx
from helpers import apply, max_abs_diff, ops, prepare


def _count(gm, *names):
    c = ops(gm)
    return sum(c.get(n, 0) for n in names)


def test_pairs_cancel_around_elementwise_ops():
    cap, gm = prepare("transpose_pairs")
    assert _count(gm, "aten.permute", "aten.transpose") == 5
    out, rec = apply("fold_transposes", gm, cap)
    assert _count(out, "aten.permute", "aten.transpose") == 0
    assert rec.stats["sunk"] >= 1 and rec.stats["cancelled"] >= 1
    assert max_abs_diff(out, cap) == 0.0


class Chains(nn.Module):
    def forward(self, x, y):
        a = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)  # identity
        b = x.transpose(1, 2).transpose(2, 3)  # one permute
        c = y.unsqueeze(2).squeeze(2)  # identity
        d = y.unsqueeze(1).unsqueeze(3).flatten(2)  # == y.unsqueeze(1)
        return a + 1, b * 2, c - 1, d


def test_chains_merge_and_shape_pairs_cancel():
    cap = anefx.capture(Chains(), (torch.randn(1, 2, 3, 4), torch.randn(2, 5)))
    out, rec = apply("fold_transposes", cap.graph_module, cap)
    assert rec.stats["merged"] >= 1 and rec.stats["reshapes_folded"] >= 2
    assert _count(out, "aten.permute", "aten.transpose") == 1
    assert _count(out, "aten.unsqueeze", "aten.squeeze") == 1
    assert _count(out, "aten.reshape", "aten.view", "aten.flatten") == 0
    assert max_abs_diff(out, cap) == 0.0


def test_lone_permute_is_left_alone_and_idempotent():
    class One(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 1).contiguous() @ x

    cap = anefx.capture(One(), (torch.randn(1, 3, 3),))
    _, rec = apply("fold_transposes", cap.graph_module, cap)
    assert not rec.modified
    cap2, gm2 = prepare("transpose_pairs")
    out, _ = apply("fold_transposes", gm2, cap2)
    _, rec2 = apply("fold_transposes", out, cap2)
    assert not rec2.modified


def test_removes_layout_round_trips_left_by_lowering():
    compiled = anefx.compile(
        *_tiny(),
        pipeline=anefx.Pipeline.from_names(["linear_to_conv", "fold_transposes"]),
        convert=False,
        never_worse=False,  # these passes' own output (without to_bc1s it has more permutes than stock)
    )
    # fc1 -> gelu -> fc2: the from/to pair around gelu cancels without to_bc1s
    assert _count(compiled.graph_module, "aten.permute") == 2  # one in, one out


def _tiny():
    from examples.models import tiny_block

    model, args, _ = tiny_block()
    return model, args


class HeadRoundTrip(nn.Module):
    """(B, C, 1, S) → (B, S, H, D) → (B, H, D, S) → (B, C, 1, S): a KV cache write of a projection;
    next to it a chain that really moves heads (H and D swapped)."""

    def forward(self, x):
        b, c, _, s = x.shape
        heads = x.squeeze(2).permute(0, 2, 1).reshape(b, s, 2, c // 2)
        kept = heads.permute(0, 2, 3, 1).reshape(b, c, 1, s)
        moved = heads.permute(0, 3, 2, 1).reshape(b, c, 1, s)
        return kept * 2, moved * 3


def test_chains_that_keep_every_element_in_place_become_one_reshape():
    cap = anefx.capture(HeadRoundTrip(), (torch.randn(1, 32, 1, 8),))
    assert _count(cap.graph_module, "aten.permute", "aten.transpose") == 3
    out, rec = apply("fold_transposes", cap.graph_module, cap)
    assert rec.stats["reshapes_folded"] >= 1
    # the round trip is gone (its output reads x directly); the real head move keeps both its permutes
    muls = [n for n in out.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert muls[0].args[0].op == "placeholder" and muls[1].args[0].op != "placeholder"
    assert _count(out, "aten.permute", "aten.transpose") == 2
    assert max_abs_diff(out, cap) == 0.0
