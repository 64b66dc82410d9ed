"""fp16_norm_scale: norms whose input squares overflow fp16 get their input pre-scaled by a power of
two (ε scaled with it); only for an fp16 target, only where the model's values need it; and the
fp16 program then matches eager where it did not (issue 20, item 3)."""

import math

import pytest
import torch
from torch import nn

import anefx
from anefx.driver.validate import ValidationOptions, Validator
from anefx.targets.mil import MILProgram
from anefx.targets.verify import check_program, input_sets_from_validator
from examples.models import large_rms_norm
from helpers import apply, ops, prepare

aten = torch.ops.aten


def _scales(gm) -> list[float]:
    return [n.args[1] for n in gm.graph.nodes if n.target == aten.mul.Tensor and isinstance(n.args[1], float)]


class BigLayerNorm(nn.Module):
    def __init__(self, peak=1000.0):
        super().__init__()
        self.up, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        with torch.no_grad():
            self.up.weight.mul_(peak / 2)

    def forward(self, x):
        return self.norm(self.up(x))


@pytest.mark.parametrize(
    "factory, prepared, norm_op",
    [
        ("large_rms_norm", ("canonicalize",), "aten.mean"),  # spelled out
        ("large_rms_norm", ("canonicalize", "rms_norm_bc1s"), "anefx.channel_layer_norm"),  # LayerNorm of [x, -x]
    ],
)
def test_rms_norm_input_is_scaled_by_a_power_of_two(factory, prepared, norm_op):
    cap, gm = prepare(factory, *prepared)
    assert norm_op in ops(gm)
    out, rec = apply("fp16_norm_scale", gm, cap)
    assert rec.modified and not rec.rolled_back, rec.error
    assert rec.stats["norms"] == 1 and 256 < rec.stats["largest_input"] < 400
    assert _scales(out) == [0.25]  # ~300 → under 128: 2⁻²
    model, _, _ = large_rms_norm()
    x = torch.randn(3, 4, 8)  # values the compile never saw
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    _again, second = apply("fp16_norm_scale", out, cap)  # idempotent: the scaled input fits
    assert not second.modified


@pytest.mark.parametrize("module", ["layer_norm", "rms_norm"])
def test_aten_norms_get_eps_scaled_with_the_input(module):
    torch.manual_seed(0)
    model = BigLayerNorm().eval()
    if module == "rms_norm":
        model.norm = nn.RMSNorm(16, eps=1e-5)
    x = torch.randn(1, 4, 8)
    cap = anefx.capture(model, (x,))
    out, rec = apply("fp16_norm_scale", cap.graph_module, cap)
    assert rec.modified and rec.stats["norms"] == 1
    (norm,) = [n for n in out.graph.nodes if n.target in (aten.layer_norm.default, aten.rms_norm.default)]
    (scale,) = _scales(out)
    largest = rec.stats["largest_input"]
    assert largest > 256 and scale == 2.0 ** -math.ceil(math.log2(largest / 128))  # under 128
    eps = norm.args[4] if module == "layer_norm" else norm.args[3]
    assert eps == 1e-5 * scale**2  # above fp16's smallest positive number: exact
    x2 = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(out(x2), model(x2), rtol=1e-4, atol=1e-4)


def test_nothing_changes_for_small_inputs_or_an_fp32_target():
    cap, gm = prepare("tiny_rms_norm", "canonicalize")
    _out, rec = apply("fp16_norm_scale", gm, cap)
    assert not rec.modified  # |x| ≈ 3: nothing overflows
    cap, gm = prepare("large_rms_norm", "canonicalize")
    res = anefx.Pipeline.from_names(["fp16_norm_scale"]).run(
        gm, cap.flat_inputs, reference_outputs=cap.reference_outputs, precision="float32"
    )
    assert not res.records[0].modified


def _artifact_check(pipeline):
    model, args, kwargs = large_rms_norm()  # the norm's input reaches ±300
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, artifact_check="off")
    program = MILProgram.from_mlmodel(compiled.mlmodel)
    cap = compiled.captured
    sets = input_sets_from_validator(
        Validator(cap.graph_module, cap.flat_inputs, ValidationOptions()),
        cap.input_names,
        cap.output_names,
        list(program.inputs()),
    )
    return compiled, check_program(program, sets)


def test_the_fp16_artifact_matches_eager_after_the_fix():
    """RMSNorm spelled out (as coremltools converts it without rms_norm_bc1s): its input reaches ±300
    and its squares overflow in the executed fp16 program; with the fix it matches eager."""
    spelled = anefx.Pipeline.default().without("rms_norm_bc1s")
    _, broken = _artifact_check(spelled.without("fp16_norm_scale"))
    assert not broken.ok and broken.max_rel_error > 0.1
    compiled, fixed = _artifact_check(spelled)
    assert fixed.ok and fixed.max_rel_error < 1e-2, fixed.message()
    record = compiled.report.record("fp16_norm_scale")  # the report names the fix
    assert record.modified and record.stats["norms"] == 1
