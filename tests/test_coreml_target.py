"""The Core ML hand-off: structure of the ML Program, names, saving, and the transformers mask ops."""

import collections
import os

import coremltools as ct
import pytest
import torch
from torch import nn

import anefx
from anefx.ir.errors import AnefxError, ConversionError
from anefx.targets.coreml import CoreMLOptions, runtime_available
from helpers import example


def test_mlp_converts_to_fp16_ml_program_with_names(tmp_path):
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args)
    spec = compiled.mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert [i.name for i in spec.description.input] == ["x"]
    assert [o.name for o in spec.description.output] == ["output"]
    assert compiled.mlmodel.compute_unit == ct.ComputeUnit.CPU_AND_NE
    # fp16 compute: the input is cast to fp16 and every conv runs on fp16 tensors
    main = compiled.artifact.package.mil_program.functions["main"]
    convs = [op for op in main.operations if op.op_type == "conv"]
    assert len(convs) == 2 and all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp16 for op in convs)
    path = compiled.save(tmp_path / "mlp.mlpackage")
    loaded = ct.models.MLModel(str(path), skip_model_load=True)
    assert loaded.get_spec().description.input[0].name == "x"
    assert spec.specificationVersion == 7  # iOS16


def test_deployment_target_and_precision_are_configurable():
    model, args, _ = example("mlp")
    compiled = anefx.compile(
        model, args, target_options=CoreMLOptions(minimum_deployment_target="iOS17", compute_precision="float32")
    )
    assert compiled.mlmodel.get_spec().specificationVersion == 8
    with pytest.raises(ConversionError, match="unknown minimum_deployment_target"):
        anefx.compile(model, args, target_options=CoreMLOptions(minimum_deployment_target="iOS99"))


def test_options_take_coremltools_enums_and_fail_fast(monkeypatch):
    model, args, _ = example("mlp")
    options = CoreMLOptions(ct.target.iOS17, ct.precision.FLOAT32, ct.ComputeUnit.CPU_ONLY)
    compiled = anefx.compile(model, args, target_options=options)
    assert compiled.mlmodel.get_spec().specificationVersion == 8
    assert compiled.mlmodel.compute_unit == ct.ComputeUnit.CPU_ONLY
    # a bad option is refused before anything is captured (capture is never called)
    import anefx.core.stages as stages  # where every front end captures

    monkeypatch.setattr(stages, "capture", lambda *a, **k: pytest.fail("captured before checking options"))
    for bad in (CoreMLOptions(compute_precision="float8"), CoreMLOptions(compute_units="NE_ONLY")):
        with pytest.raises(ConversionError, match=r"unknown compute_(precision|units)"):
            anefx.compile(model, args, target_options=bad)


class NewOnesAnd(nn.Module):
    """The two mask ops transformers 5.x emits that coremltools 9.0 cannot convert by itself."""

    def forward(self, x, mask):
        keep = mask.bool()[:, None, :] & mask.new_ones((1, 1, x.shape[1]), dtype=torch.bool)
        return x.masked_fill(~keep.transpose(1, 2), 0.0)


def _mask_case():
    x = torch.randn(1, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return NewOnesAnd(), (x, mask)


def test_stock_coremltools_rejects_new_ones():
    model, args = _mask_case()
    ep = torch.export.export(model, args, strict=False).run_decompositions({})
    ops = collections.Counter(str(n.target) for n in ep.graph.nodes)
    assert ops["aten.new_ones.default"] == 1 and ops["aten.__and__.Tensor"] == 1
    with pytest.raises(Exception, match="new_ones"):
        ct.convert(ep, convert_to="mlprogram")


@pytest.mark.parametrize("pipeline", ["default", "empty"])
def test_new_ones_and_bitwise_and_convert(pipeline):
    """Converts with the default passes, and also with none (the target legalizes by itself)."""
    model, args = _mask_case()
    p = anefx.Pipeline.default() if pipeline == "default" else anefx.Pipeline.empty()
    compiled = anefx.compile(model, args, pipeline=p)
    ops = compiled.op_histogram()
    assert "logical_and" in ops or "select" in ops
    torch.testing.assert_close(compiled(*args), model(*args))


def test_transformers_mask_ops_in_distilbert_convert():
    model, args, kwargs = example("distilbert_small", pad=3)
    compiled = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty())
    assert compiled.op_histogram()["softmax"] == 2


def test_conversion_error_names_the_op_and_line():
    class UsesUnsupported(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)  # no Core ML converter

    with pytest.raises(ConversionError, match=r"bessel_j0.*test_coreml_target.py:\d+"):
        anefx.compile(UsesUnsupported(), (torch.randn(4),))


def test_save_errors_leave_nothing_behind(tmp_path):
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args)
    with pytest.raises(AnefxError, match="does not exist"):
        compiled.save(tmp_path / "missing" / "m.mlpackage")
    with pytest.raises(AnefxError, match="suffix"):
        compiled.save(tmp_path / "m.onnx")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AnefxError, match="not a directory"):
        compiled.save(tmp_path / "afile" / "m.mlpackage")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(AnefxError, match="not writable"):
            compiled.save(ro / "m.mlpackage")
        ro.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not runtime_available()[0], reason=runtime_available()[1])
def test_predict_matches_pytorch_on_macos():
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args)
    (out,) = anefx.load(compiled, runtime="coreml")({"x": args[0].numpy()}).values()
    torch.testing.assert_close(torch.from_numpy(out).float(), model(*args), atol=5e-2, rtol=5e-2)


def test_predict_off_macos_says_why():
    if runtime_available()[0]:
        pytest.skip("this machine can run Core ML")
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args)
    with pytest.raises(anefx.TargetUnavailableError, match="needs macOS"):
        anefx.load(compiled, runtime="coreml")


@pytest.mark.parametrize("name", ["distilbert_small", "vit", "t5_encoder"])
def test_fast_conversion_gives_the_same_program_as_coremltools_route(name):
    """The lifted ExportedProgram and the faster MIL pipeline change conversion time, never the program:
    op for op (type and output dtype) the same as a fresh torch.export + coremltools' own pipeline."""
    from anefx.targets.coreml import CoreMLTarget
    from anefx.targets.handoff import HandOff, ProgramSpec, legalized_clone
    from anefx.targets.lift import lifted_program

    model, args, kwargs = example(name)
    fast = anefx.compile(model, args, kwargs)
    handoff = HandOff(
        fast.graph_module,
        fast.captured.example_args,
        fast.captured.example_kwargs,
        fast.captured.input_names,
        fast.captured.output_names,
    )
    assert lifted_program(legalized_clone(handoff)) is not None  # the fast route really ran
    slow = CoreMLTarget(CoreMLOptions(fast_conversion=False)).convert(ProgramSpec({"main": handoff}))

    def program(artifact):
        return [(op.op_type, str(op.outputs[0].dtype)) for op in artifact.operations()]

    assert fast.op_histogram() == slow.op_histogram()
    assert program(fast.artifact) == program(slow)
    names = [[i.name for i in a.model.get_spec().description.input] for a in (fast.artifact.package, slow)]
    assert names == [fast.captured.input_names] * 2
    assert fast.report.timings.keys() >= {"capture", "passes", "convert", "convert.export", "convert.ct_convert"}


def test_decomposing_the_lifted_program_keeps_the_input_names():
    """A re-trace names positional inputs ``arg_0`` …; the Core ML inputs are named after them."""
    from anefx.targets.handoff import HandOff, legalized_clone
    from anefx.targets.lift import keep_input_names, lifted_program

    model, args, kwargs = example("distilbert_small")
    compiled = anefx.compile(model, args, kwargs, convert=False)
    cap = compiled.captured
    handoff = HandOff(compiled.graph_module, cap.example_args, cap.example_kwargs, cap.input_names, cap.output_names)
    ep = lifted_program(legalized_clone(handoff))
    redone = ep.run_decompositions({})

    def user_inputs(program):
        return [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]

    assert user_inputs(redone) != cap.input_names  # what the re-trace does on its own
    kept = keep_input_names(ep, redone)
    assert user_inputs(kept) == cap.input_names == ["input_ids", "attention_mask"]
    ref = model(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(kept.module()(*args, **kwargs).last_hidden_state, ref, atol=1e-4, rtol=1e-4)
