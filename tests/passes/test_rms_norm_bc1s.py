import pytest
import torch
from torch import nn

import anefx
from examples.models import TinyRMSNorm, tiny_rms_norm
from helpers import apply, half_copy, ops, prepare

NORM = torch.ops.anefx.channel_layer_norm.default


def test_rms_norm_becomes_one_channel_layer_norm():
    cap, gm = prepare("tiny_rms_norm", "canonicalize")
    out, rec = apply("rms_norm_bc1s", gm, cap)
    counts = ops(out)
    assert rec.stats["rewritten"] == 1 and not rec.rolled_back
    assert counts["anefx.channel_layer_norm"] == 1
    assert not {"aten.pow", "aten.rsqrt", "aten.mean"} & set(counts)
    norm = next(n for n in out.graph.nodes if n.target == NORM)
    assert norm.args[0].meta["val"].shape == (1, 16, 1, 4)  # [x, -x] on the channel axis of (B, C, 1, S)
    model, _, _ = tiny_rms_norm()
    x = torch.randn(1, 4, 8) * 5  # values the compile never saw
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_eps_semantics_match_exactly(eps, scale):
    """RMSNorm adds eps inside the mean square; layer_norm over [x, -x] adds it to the variance,
    which is the same number: small activations (where eps dominates) must match too."""
    torch.manual_seed(0)
    model = TinyRMSNorm(c=16, eps=eps).eval()
    x = torch.randn(2, 5, 16) * scale
    cap = anefx.capture(model, (x,))
    out, rec = apply("rms_norm_bc1s", cap.graph_module, cap)
    assert rec.modified and not rec.rolled_back
    x2 = torch.randn(2, 5, 16) * scale
    torch.testing.assert_close(out(x2), model(x2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_weight", [True, False])
def test_weight_as_gamma_or_after(fold_weight):
    cap, gm = prepare("tiny_rms_norm", "canonicalize")
    out, rec = apply("rms_norm_bc1s", gm, cap, fold_weight=fold_weight)
    norm = next(n for n in out.graph.nodes if n.target == NORM)
    assert (norm.args[1] is not None) == fold_weight
    assert rec.max_rel_error < 1e-5


def test_torch_rms_norm_and_weightless():
    torch.manual_seed(0)
    for model in (nn.RMSNorm(16, eps=1e-5), nn.RMSNorm(16, elementwise_affine=False)):
        if model.weight is not None:
            nn.init.normal_(model.weight, 1.0, 0.2)
        x = torch.randn(1, 6, 16)
        compiled = anefx.compile(model.eval(), (x,), convert=False, never_worse=False)  # the pass alone
        rec = compiled.report.record("rms_norm_bc1s")
        assert rec.modified and not rec.rolled_back, rec
        x2 = torch.randn(1, 6, 16) * 3
        torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-6)


def test_per_head_and_non_channel_norms_are_left_alone():
    class OverSeq(nn.Module):
        def forward(self, x):  # mean square over the sequence axis: not a channel norm
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)

    class PerHead(nn.Module):  # (B, S, H, D): QK-norm, the attention pass's business
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    for model, x in ((OverSeq(), torch.randn(1, 6, 16)), (PerHead(), torch.randn(1, 6, 2, 8))):
        cap = anefx.capture(model, (x,))
        _, rec = apply("rms_norm_bc1s", cap.graph_module, cap)
        assert not rec.modified


def test_fp16_and_idempotence():
    model, args = half_copy(TinyRMSNorm().eval(), (torch.randn(1, 4, 8),))
    pipeline = anefx.Pipeline.from_names(["rms_norm_bc1s"])
    compiled = anefx.compile(model, args, pipeline=pipeline, convert=False, never_worse=False)  # the pass alone
    rec = compiled.report.record("rms_norm_bc1s")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-2
    _, rec2 = apply("rms_norm_bc1s", compiled.graph_module, compiled.captured)
    assert not rec2.modified


def test_a_lone_norm_is_kept_stock_by_the_guard_and_converts():
    """A lone RMSNorm on (B, S, C): in and out of (B, C, 1, S) would cost two transposes where stock
    has none, so the guard refuses its site (it declares one); the stock form converts because
    ``canonicalize`` writes ``aten.rms_norm``'s default eps as a number."""
    model = nn.RMSNorm(16).eval()
    x = torch.randn(1, 6, 16)
    compiled = anefx.compile(model, (x,))
    info = compiled.report.guard
    assert len(info["kept"]) == 1 and not info.get("shipped") and not info.get("fallback"), info
    ops = compiled.op_histogram()
    assert "transpose" not in ops and "reshape" not in ops, ops
    torch.testing.assert_close(compiled(x * 3), model(x * 3), rtol=1e-5, atol=1e-6)
