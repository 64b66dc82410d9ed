import dataclasses

import pytest
import torch
import torch.fx
from torch.fx.passes.infra.pass_manager import PassManager

import anefx
from anefx.passes import Pass, PassResult, pass_by_name
from anefx.passes.base import finish
from helpers import example, ops


class FlipSign(Pass):
    """A deliberately wrong pass: negates the graph's output."""

    name = "flip_sign"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0][0]
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(torch.ops.aten.neg.default, (value,))
        out.args = ((neg,),)
        return finish(gm, True, flipped=1)


class Raises(Pass):
    name = "raises"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_pipeline_is_immutable_and_editable():
    p = anefx.Pipeline.default()
    names = p.names
    assert names[:2] == ["canonicalize", "fold_constants"]
    q = p.without("fold_transposes")
    assert "fold_transposes" not in q.names and p.names == names
    r = p.with_options("linear_to_conv", min_channels=64)
    assert r.passes[r.names.index("linear_to_conv")].options.min_channels == 64
    assert p.passes[p.names.index("linear_to_conv")].options.min_channels == 1
    s = p.insert_before("to_bc1s", FlipSign()).append(Raises())
    assert s.names.index("flip_sign") == s.names.index("to_bc1s") - 1 and s.names[-1] == "raises"
    with pytest.raises(KeyError, match="no pass named 'nope'"):
        p.without("nope")
    with pytest.raises(TypeError, match="unknown option"):
        p.with_options("linear_to_conv", min_chanels=3)
    with pytest.raises(KeyError, match="unknown pass"):
        anefx.Pipeline.from_names(["nope"])
    with pytest.raises(dataclasses.FrozenInstanceError):  # options are frozen dataclasses
        pass_by_name("fold_constants").options.max_numel = 3


def test_wrong_pass_is_rolled_back_and_output_stays_correct():
    model, args, kwargs = example("mlp_block")
    pipeline = anefx.Pipeline.default().insert_after("linear_to_conv", FlipSign())
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, convert=False)
    rec = compiled.report.record("flip_sign")
    assert rec.rolled_back and rec.modified
    assert "differs by up to" in rec.error
    assert [r.name for r in compiled.report.rolled_back] == ["flip_sign"]
    assert compiled.report.record("to_bc1s").modified  # the pipeline went on
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    assert "ROLLED BACK" in str(compiled.report)


def test_raising_pass_is_rolled_back_with_its_error():
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args, pipeline=anefx.Pipeline.default().append(Raises()), convert=False)
    rec = compiled.report.record("raises")
    assert rec.rolled_back and rec.error == "raised RuntimeError: boom"
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_records_hold_timing_errors_and_stats():
    model, args, _ = example("mlp_block")
    compiled = anefx.compile(model, args, convert=False)
    recs = {r.name: r for r in compiled.report.records}
    assert list(recs) == anefx.Pipeline.default().names
    conv = recs["linear_to_conv"]
    assert conv.modified and conv.stats["converted"] == 2 and conv.seconds > 0
    assert conv.max_abs_error is not None and conv.max_abs_error < 1e-5
    assert not recs["canonicalize"].modified and recs["canonicalize"].max_abs_error is None
    data = compiled.report.to_dict()
    assert data["passes"][0]["name"] == "canonicalize" and "status" in data["passes"][0]


def test_lint_mode_does_not_catch_numeric_errors_but_numeric_does():
    model, args, _ = example("mlp")
    pipeline = anefx.Pipeline.empty().append(FlipSign())
    lint_only = anefx.compile(model, args, pipeline=pipeline, convert=False, validate="lint")
    assert not lint_only.report.record("flip_sign").rolled_back
    numeric = anefx.compile(model, args, pipeline=pipeline, convert=False)
    assert numeric.report.record("flip_sign").rolled_back


def test_validate_env_var(monkeypatch):
    monkeypatch.setenv("ANEFX_VALIDATE", "off")
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args, pipeline=anefx.Pipeline.empty().append(FlipSign()), convert=False)
    assert not compiled.report.record("flip_sign").rolled_back  # validation off: nothing checked
    monkeypatch.setenv("ANEFX_VALIDATE", "bogus")
    with pytest.raises(ValueError, match="off, lint or numeric"):
        anefx.compile(model, args, convert=False)


def test_input_graph_is_never_modified():
    cap_model, args, _ = example("block_stack")
    cap = anefx.capture(cap_model, args)
    before = ops(cap.graph_module)
    anefx.Pipeline.default().run(cap.graph_module, cap.flat_inputs)
    assert ops(cap.graph_module) == before


def test_passes_work_in_torch_pass_manager():
    model, args, _ = example("mlp_block")
    gm = anefx.capture(model, args).graph_module
    pm = PassManager(passes=[pass_by_name("linear_to_conv")])
    result = pm(gm)
    assert result.modified
    assert ops(result.graph_module).get("aten.conv2d") == 2
    assert isinstance(pass_by_name("linear_to_conv")(gm), PassResult)


def test_explicit_arguments_beat_the_environment(monkeypatch):
    monkeypatch.setenv("ANEFX_VALIDATE", "off")
    model, args, _ = example("mlp")
    pipeline = anefx.Pipeline.empty().append(FlipSign())
    for explicit in ({"validate": "numeric"}, {"validation": anefx.ValidationOptions(mode="numeric")}):
        compiled = anefx.compile(model, args, pipeline=pipeline, convert=False, **explicit)
        assert compiled.report.record("flip_sign").rolled_back, explicit  # numeric ran despite the env


def test_unknown_keyword_names_compile():
    model, args, _ = example("mlp")
    with pytest.raises(TypeError, match=r"compile\(\) got unexpected keyword argument\(s\) \['validat'\]"):
        anefx.compile(model, args, validat="off")


def test_pass_summary_is_the_first_line_without_the_name():
    class Dashed(Pass):
        """``dashed`` - splits on a hyphen — and keeps this em dash."""

        name = "dashed"

        def run(self, gm, ctx):
            return PassResult(gm, False)

    class Plain(Pass):
        """Says what it does — no name first."""

        name = "plain"

        def run(self, gm, ctx):
            return PassResult(gm, False)

    assert Dashed.summary() == "splits on a hyphen — and keeps this em dash."
    assert Plain.summary() == "Says what it does — no name first."
