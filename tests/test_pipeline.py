import dataclasses
import inspect

import pytest
import torch
import torch.fx
from torch.fx.passes.infra.pass_manager import PassManager

import anefx
from anefx.ir.errors import PipelineOrderError
from anefx.passes import Pass, PassResult, pass_by_name
from anefx.passes.base import finish
from examples import models
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
    assert names.index("canonicalize") < names.index("fold_constants") < names.index("linear_to_conv")
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
    # the passes' own records (mlp_block's convs cost 2 transposes stock has not: the guard keeps it stock)
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, convert=False, never_worse=False)
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
    compiled = anefx.compile(model, args, convert=False, never_worse=False)  # the passes' own records
    recs = {r.name: r for r in compiled.report.records}
    assert list(recs) == anefx.Pipeline.default().names
    conv = recs["linear_to_conv"]
    assert conv.modified and conv.stats["converted"] == 2 and isinstance(conv.seconds, float)
    assert conv.max_abs_error is not None and conv.max_abs_error < 1e-5
    assert not recs["canonicalize"].modified and recs["canonicalize"].max_abs_error is None
    data = compiled.report.to_dict()
    assert [p["name"] for p in data["passes"]] == list(recs) and all("status" in p for p in data["passes"])


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
    with pytest.raises(ValueError, match="off, lint, example or numeric"):
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


class BreakOneSite(Pass):
    """Rewrites every LayerNorm (its sites) into ``layer_norm * k``: k = 1 everywhere but at the
    ``bad``-th LayerNorm, where the rewrite is wrong."""

    name = "break_one_site"

    def __init__(self, bad: int = 7):
        super().__init__()
        self.bad = bad

    def run(self, gm, ctx):
        norms = [n for n in gm.graph.nodes if n.target == torch.ops.aten.layer_norm.default]
        changed = 0
        for i, node in enumerate(norms):
            if not ctx.site(node):
                continue
            with gm.graph.inserting_after(node):
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.01 if i == self.bad else 1.0))
            node.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)
            changed += 1
        return finish(gm, bool(changed), rewritten=changed)


def _twelve_layers():
    model, args, _ = example("block_stack", n=12)
    torch.manual_seed(1)
    with torch.no_grad():  # nothing zero or identity: norm weights around 1, every bias non-zero
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model, args


def test_a_pass_broken_at_one_site_of_twelve_keeps_the_other_eleven():
    model, args = _twelve_layers()
    compiled = anefx.compile(model, args, pipeline=anefx.Pipeline.empty().append(BreakOneSite(bad=7)), convert=False)
    rec = compiled.report.record("break_one_site")
    assert not rec.rolled_back and rec.sites == 12 and len(rec.excluded_sites) == 1
    norms = [n for n in compiled.captured.graph_module.graph.nodes if n.target == torch.ops.aten.layer_norm.default]
    site = rec.excluded_sites[0]
    assert site["site"] == norms[7].name and site["op"] == "aten.layer_norm"
    assert site["where"].endswith(f"models.py:{inspect.getsourcelines(models.MLPBlock.forward)[1] + 1}")
    assert "differs by up to" in site["error"]
    muls = [n for n in compiled.graph_module.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert len(muls) == 11 and all(m.args[1] == 1.0 for m in muls)
    torch.testing.assert_close(compiled(*args), model(*args))
    text = str(compiled.report)
    assert "1 of 12 sites excluded" in text and f"site %{norms[7].name} (aten.layer_norm)" in text


def test_each_pass_drops_only_its_own_bad_site_and_a_pass_without_sites_rolls_back_whole():
    model, args = _twelve_layers()
    broken = [BreakOneSite(bad=i) for i in (2, 9)]
    both = anefx.compile(model, args, pipeline=anefx.Pipeline.empty().append(*broken), convert=False)
    assert [len(r.excluded_sites) for r in both.report.records] == [1, 1]
    raises = anefx.compile(model, args, pipeline=anefx.Pipeline.empty().append(Raises()), convert=False)
    assert raises.report.records[0].rolled_back and raises.report.records[0].sites is None


def test_site_wise_passes_declare_their_sites():
    model, args, kwargs = example("bert")
    compiled = anefx.compile(model, args, kwargs, convert=False)
    sites = {r.name: r.sites for r in compiled.report.records}
    layers = model.config.num_hidden_layers
    assert sites["linear_to_conv"] == 6 * layers  # q, k, v, o, up, down
    assert sites["layer_norm_bc1s"] == 2 * layers + 1  # two per layer and the embeddings'
    assert sites["attention_bc1s"] == layers
    assert all(not r.excluded_sites and not r.rolled_back for r in compiled.report.records)


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


def test_pass_order_constraints_are_checked_when_a_pipeline_is_built():
    default = anefx.Pipeline.default()
    for p in default.passes:  # the default order honours every declaration
        assert all(default.names.index(n) < default.names.index(p.name) for n in p.runs_after if n in default.names)
    with pytest.raises(PipelineOrderError, match=r"'to_bc1s' \(position 0\) must run after \['linear_to_conv'\]"):
        anefx.Pipeline.from_names(["to_bc1s", "linear_to_conv"])
    with pytest.raises(PipelineOrderError, match="attention_bc1s"):
        default.without("attention_bc1s").insert_after("to_bc1s", pass_by_name("attention_bc1s"))
    assert anefx.Pipeline.from_names(["linear_to_conv", "to_bc1s"]).names == ["linear_to_conv", "to_bc1s"]
    assert default.without("linear_to_conv").names  # removing a pass another runs after is fine


def test_the_options_object_sits_between_the_arguments_and_the_environment(monkeypatch):
    """One rule for every front end: an explicit argument > CompileOptions > ANEFX_VALIDATE."""
    monkeypatch.setenv("ANEFX_VALIDATE", "numeric")
    model, args, _ = example("mlp")
    options = anefx.CompileOptions(pipeline=anefx.Pipeline.empty().append(FlipSign()), validate="off", convert=False)
    assert not anefx.compile(model, args, options=options).report.record("flip_sign").rolled_back
    explicit = anefx.compile(model, args, options=options, validate="numeric")
    assert explicit.report.record("flip_sign").rolled_back
