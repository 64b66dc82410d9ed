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
    # the round trip is gone (its output reads x directly); the real head move is one permute (the
    # first sinks below the split of C into heads and merges with the second)
    muls = [n for n in out.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert muls[0].args[0].op == "placeholder" and muls[1].args[0].op != "placeholder"
    assert _count(out, "aten.permute", "aten.transpose") == 1
    assert max_abs_diff(out, cap) == 0.0


class Unpatchify(nn.Module):
    """DiT's unpatchify: tokens (B, h·w, p·p·C) → (B, h, w, p, p, C) → einsum → (B, C, h·p, w·p),
    after a projection that anefx computes in (B, C, 1, S)."""

    def __init__(self, c=4, p=2, h=4, w=4, dim=8):
        super().__init__()
        self.c, self.p, self.h, self.w = c, p, h, w
        self.proj = nn.Linear(dim, p * p * c)

    def forward(self, tokens):
        x = self.proj(tokens).reshape(-1, self.h, self.w, self.p, self.p, self.c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, self.c, self.h * self.p, self.w * self.p)


def test_a_permute_sinks_below_a_reshape_that_splits_axes_and_merges():
    """The change out of (B, C, 1, S), the split into patches and the einsum (a permute after
    ``canonicalize``) become one reshape and one permute: the stock count, where the passes alone
    had the change out of (B, C, 1, S) too."""
    torch.manual_seed(0)
    model, x = Unpatchify().eval(), torch.randn(2, 16, 8)
    cap, gm = (c := anefx.capture(model, (x,))), c.graph_module
    passes = ["canonicalize", "linear_to_conv"]
    gm = (
        anefx.Pipeline.from_names(passes).run(gm, cap.flat_inputs, reference_outputs=cap.reference_outputs).graph_module
    )
    assert "aten.einsum" not in ops(gm)
    out, rec = apply("fold_transposes", gm, cap)
    assert rec.stats["sunk"] >= 1
    moves = (torch.ops.aten.permute.default, torch.ops.aten.reshape.default)
    moving = [n.target.__name__ for n in out.graph.nodes if n.target in moves]
    # the token input's change into (B, C, 1, S), then one reshape into patches, one permute, one reshape
    assert moving == ["permute.default", "reshape.default", "permute.default", "reshape.default"], moving
    x2 = torch.randn(2, 16, 8) * 3
    torch.testing.assert_close(out(x2), model(x2), atol=1e-5, rtol=1e-5)


class QueryColumn(nn.Module):
    """A one-token query (1, H·D, 1, 1) viewed per head as (1, H, D, 1) and read by ``q^T @ K``, or
    by an elementwise op after the same swap."""

    def forward(self, q, k):
        qt = q.view(1, 4, 16, 1).transpose(-2, -1)  # (1, 4, 1, 16): every element in place
        return qt @ k, q.view(1, 4, 16, 1).transpose(-2, -1) + 1


def test_a_unit_axis_swap_read_by_a_matmul_stays_a_view_and_a_swap():
    """Into a product the swap is the product's transpose_x (coremltools folds it) and the view keeps
    the last axis: no copy; one reshape (1, 64, 1, 1) → (1, 4, 1, 16) would copy the padded column.
    Read elementwise, the same chain becomes that one reshape."""
    cap = anefx.capture(QueryColumn(), (torch.randn(1, 64, 1, 1), torch.randn(1, 4, 16, 8)))
    out, _ = apply("fold_transposes", cap.graph_module, cap)
    aten = torch.ops.aten
    (mm,) = [n for n in out.graph.nodes if n.target == aten.matmul.default]
    swap = mm.args[0]
    assert swap.target == aten.permute.default and swap.args[1] == [0, 1, 3, 2]
    assert swap.args[0].meta["val"].shape == (1, 4, 16, 1)
    (add,) = [n for n in out.graph.nodes if n.target == aten.add.Tensor]
    assert add.args[0].target == aten.reshape.default and add.args[0].args[0].op == "placeholder"
    assert _count(out, "aten.permute", "aten.transpose") == 1
    assert max_abs_diff(out, cap) == 0.0
