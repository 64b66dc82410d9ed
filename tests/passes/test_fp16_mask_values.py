"""fp16_mask_values changes mask values only, and only for an fp16 target (issue 11, item 2)."""

import torch
from torch import nn

import anefx
from anefx.targets.coreml import CoreMLOptions

aten = torch.ops.aten
FMIN = torch.finfo(torch.float32).min


class Masked(nn.Module):
    """Attention scores masked three ways (fp32 extremes), next to big negatives that are no mask."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(8, 8, generator=gen))
        self.register_buffer("causal", torch.zeros(6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), -1e30))
        self.proj.data /= 8.0
        self.register_buffer("offset", torch.full((6, 8), -1e6))  # no softmax reads it: not a mask

    def forward(self, x, keep):
        h = x @ self.proj
        s = h @ h.transpose(1, 2)
        s = s + (1.0 - keep[:, None, :].float()) * FMIN  # built from the fp32 minimum
        s = s.masked_fill(~keep[:, None, :], -1e9) + self.causal
        y = torch.softmax(s, -1) @ h
        z = torch.clamp(h * -1e6, min=-1e5) + self.offset  # big negatives on activations
        return y, z


def _run(precision):
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 6, dtype=torch.bool)
    cap = anefx.capture(Masked().eval(), (x, keep))
    res = anefx.Pipeline.from_names(["fp16_mask_values"]).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs, precision=precision
    )
    return cap, res.graph_module, res.records[0]


def _scalars(gm):
    return sorted(
        a for n in gm.graph.nodes if n.op == "call_function" for a in n.args if isinstance(a, float) and a < -1e3
    )


def test_only_mask_values_change():
    cap, gm, rec = _run("float16")
    assert rec.modified and not rec.rolled_back, rec.error
    assert rec.stats == {"scalars": 2, "constants": 1}
    assert _scalars(gm) == [-1e6, -1e5, -1e4, -1e4]  # the activation's factor and clamp stay
    assert float(gm.causal.min()) < -1e29 and float(gm.offset.min()) == -1e6  # originals untouched
    consts = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert sorted(float(v.min()) for v in consts.values() if v.shape == (6, 6)) == [-1e4]  # the mask buffer
    x = cap.flat_inputs[0]
    keep = torch.tensor([[True] * 6, [True, False, True, False, False, True]])  # every row keeps key 0
    y, z = gm(x, keep)
    ref_y, ref_z = cap.graph_module(x, keep)
    torch.testing.assert_close(y, ref_y)
    assert torch.equal(z, ref_z)  # the non-mask computation is bit for bit the model's


def test_fp32_target_keeps_the_values():
    _, gm, rec = _run("float32")
    assert not rec.modified
    assert _scalars(gm) == sorted([FMIN, -1e9, -1e6, -1e5])


def test_compile_passes_the_targets_precision():
    x, keep = torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    fp32 = anefx.compile(
        Masked().eval(), (x, keep), target_options=CoreMLOptions(compute_precision="float32"), convert=False
    )
    fp16 = anefx.compile(Masked().eval(), (x, keep), convert=False)
    assert not fp32.report.record("fp16_mask_values").modified
    assert fp16.report.record("fp16_mask_values").modified
