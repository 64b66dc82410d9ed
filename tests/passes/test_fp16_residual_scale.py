"""fp16_residual_scale: a residual stream beyond fp16's range is carried scaled by a power of two
(what enters scaled, norms reading it with ε scaled, any other reader unscaled); the fp16 program
then runs without inf where it overflowed (issue 20, item 3)."""

import torch
from torch import nn

import anefx
from anefx.driver.validate import ValidationOptions, Validator
from anefx.targets.mil import MILProgram
from anefx.targets.verify import check_program, input_sets_from_validator
from examples.models import LargeResidual, large_residual
from helpers import apply, prepare

aten = torch.ops.aten


def _scaled_weights(gm) -> set[str]:
    """The get_attr targets multiplied by a scalar (weights folded with the stream's scale)."""
    return {
        n.args[0].target
        for n in gm.graph.nodes
        if n.target == aten.mul.Tensor and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
    }


def test_the_stream_is_scaled_from_where_it_overflows():
    cap, gm = prepare("large_residual", "canonicalize")
    out, rec = apply("fp16_residual_scale", gm, cap)
    assert rec.modified and not rec.rolled_back, rec.error
    assert rec.stats["scale"] == 2.0**-3 and rec.stats["largest"] > 65504  # ~100,000 → under 16,384
    # enters: the stream before the overflow (a mul), blocks 1 and 2's down projections (weights)
    assert _scaled_weights(out) == {"downs.1.weight", "downs.1.bias", "downs.2.weight", "downs.2.bias"}
    assert (rec.stats["entries"], rec.stats["norms"], rec.stats["exits"]) == (3, 2, 0)  # norms of block 2, final
    model, _, _ = large_residual()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)
    _, again = apply("fp16_residual_scale", out, cap)
    assert not again.modified  # the scaled stream fits


class StreamOut(LargeResidual):
    """The stream itself is also an output: a reader that needs its value (scaled back)."""

    def forward(self, x):
        h = self.embed(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(nn.functional.gelu(up(norm(h))))
        return self.head(self.final(h)), h


def test_readers_other_than_norms_get_the_value_back():
    torch.manual_seed(0)
    model, x = StreamOut().eval(), torch.randn(1, 4, 16)
    cap = anefx.capture(model, (x,))
    out, rec = apply("fp16_residual_scale", cap.graph_module, cap)
    assert rec.modified and rec.stats["exits"] == 1
    x2 = torch.randn(1, 4, 16)
    with torch.no_grad():
        for got, want in zip(out(x2), model(x2)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_no_change_for_small_streams_or_fp32():
    cap, gm = prepare("tiny_block", "canonicalize")
    assert not apply("fp16_residual_scale", gm, cap)[1].modified
    cap, gm = prepare("large_residual", "canonicalize")
    res = anefx.Pipeline.from_names(["fp16_residual_scale"]).run(
        gm, cap.flat_inputs, reference_outputs=cap.reference_outputs, precision="float32"
    )
    assert not res.records[0].modified


def _check(pipeline):
    model, args, kwargs = large_residual()
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, artifact_check="off")
    program = MILProgram.from_mlmodel(compiled.mlmodel)
    cap = compiled.captured
    validator = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions())
    sets = input_sets_from_validator(validator, cap.input_names, cap.output_names, list(program.inputs()))
    return compiled, check_program(program, sets)


def test_the_fp16_artifact_runs_without_inf_after_the_fix():
    _, broken = _check(anefx.Pipeline.default().without("fp16_residual_scale"))
    assert not broken.ok and broken.outputs["output"].nonfinite > 0
    compiled, fixed = _check(anefx.Pipeline.default())
    assert fixed.ok, fixed.message()
    assert compiled.report.record("fp16_residual_scale").stats["scale"] == 0.125
