"""The Core AI hand-off (``target="coreai"``, optional extra ``anefx[coreai]``)."""

import inspect
import sys

import numpy as np
import pytest
import torch

import anefx
from anefx.targets import coreai
from examples import models
from helpers import example

needs_coreai = pytest.mark.skipif(not coreai.available()[0], reason=coreai.available()[1])


def test_without_the_extra_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "coreai_torch", None)  # as if it were not installed
    model, args, _ = example("mlp")
    with pytest.raises(anefx.TargetUnavailableError, match=r"pip install 'anefx\[coreai\]'"):
        anefx.compile(model, args, target="coreai")
    assert anefx.compile(model, args).op_histogram()["conv"] == 2  # Core ML still works


@needs_coreai
@pytest.mark.parametrize("name", ["mlp", "block_stack"])
def test_small_models_save_an_aimodel(name, tmp_path):
    model, args, kwargs = example(name)
    compiled = anefx.compile(model, args, kwargs, target="coreai", never_worse=False)  # the passes' own output
    ops = compiled.op_histogram()
    assert ops["conv2d"] == (2 if name == "mlp" else 4)
    assert not {"decomposable.broadcasting_batch_matmul", "matmul", "linear"} & set(ops)
    path = compiled.save(tmp_path / f"{name}.aimodel")
    assert (path / "main.mlirb").exists() and (path / "metadata.json").exists()
    with pytest.raises(anefx.AnefxError, match="suffix"):
        compiled.save(tmp_path / "x.mlpackage")
    coreml = anefx.compile(model, args, kwargs, never_worse=False).op_histogram()
    assert ops.get("transpose", 0) == coreml.get("transpose", 0)  # same layout changes in both formats


@needs_coreai
def test_source_locations_reach_the_program():
    model, args, _ = example("mlp")
    compiled = anefx.compile(model, args, target="coreai")
    convs = [op for op in compiled.artifact.package.operations() if op.name == "conv2d"]
    forward = inspect.getsource(models.MLP.forward).splitlines()
    line = inspect.getsourcelines(models.MLP.forward)[1] + next(i for i, t in enumerate(forward) if "self.fc2(" in t)
    assert convs and all(op.location and op.location.endswith(f"models.py:{line}") for op in convs)
    assert "coreai.conv2d" in compiled.artifact.package.ir_text()


@needs_coreai
def test_full_size_distilbert(tmp_path):
    model, args, kwargs = example("distilbert")
    compiled = anefx.compile(model, args, kwargs, target="coreai")
    ops = compiled.op_histogram()
    assert ops["conv2d"] == 36
    # attention is the only matmul-like work left: 2 per head (coreai-torch decomposes einsum to bmm)
    assert ops["decomposable.broadcasting_batch_matmul"] == 2 * 12 * 6
    assert ops["transpose"] == 8  # as in the Core ML program
    assert not compiled.report.rolled_back
    if coreai.runtime_available()[0]:  # and the saved program runs (coreai-core, Linux's CPU) as eager does
        program = anefx.load(compiled.save(tmp_path / "distilbert.aimodel"))
        (out,) = program({"input_ids": args[0], "attention_mask": kwargs["attention_mask"]}).values()
        with torch.no_grad():
            want = model(*args, **kwargs).last_hidden_state
        assert np.abs(out - want.numpy()).max() <= 1e-5 * float(want.abs().max())
        program.close()


needs_runtime = pytest.mark.skipif(not coreai.runtime_available()[0], reason=coreai.runtime_available()[1])


@needs_coreai
@needs_runtime
@pytest.mark.parametrize("name", ["mlp", "block_stack", "distilbert_small"])
def test_saved_aimodels_run_and_match_eager(name, tmp_path):
    """coreai-core's runtime runs .aimodel files on Linux's CPU; anefx.load gives them the same
    interface as a Core ML package. The programs are fp32: eager within 1e-5 of the output's scale."""
    model, args, kwargs = example(name)
    path = anefx.compile(model, args, kwargs, target="coreai", never_worse=False).save(tmp_path / f"{name}.aimodel")
    program = anefx.load(path)
    assert program.runtime == "coreai" and program.functions == ["main"] and program.states() == {}
    values = [*args, *kwargs.values()]
    assert [tuple(s.shape) for s in program.inputs().values()] == [tuple(v.shape) for v in values]
    other = [torch.randn(v.shape) if v.is_floating_point() else v for v in values]  # inputs it never saw
    for feed in (values, other):
        (out,) = program(dict(zip(program.inputs(), feed))).values()
        with torch.no_grad():
            want = model(*feed[: len(args)], **dict(zip(kwargs, feed[len(args) :])))
        want = getattr(want, "last_hidden_state", want)
        assert out.dtype == np.float32
        assert np.abs(out - want.numpy()).max() <= 1e-5 * float(want.abs().max())
    program.close()


class KVWrite(torch.nn.Module):
    """A cache buffer written at a run-time position with ``index_copy_`` (as a KV cache is)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("k_cache", torch.zeros(1, 4, 8))

    def forward(self, x, pos):
        self.k_cache.index_copy_(2, pos, self.proj(x).transpose(1, 2))
        return self.k_cache.sum(-1)


@needs_coreai
@needs_runtime
def test_a_stateful_aimodel_keeps_its_state_across_calls(tmp_path):
    import coreai_torch

    torch.manual_seed(0)
    model = KVWrite().eval()
    x, pos = torch.randn(1, 1, 4), torch.tensor([2])
    ep = torch.export.export(model, (x, pos), strict=False).run_decompositions(coreai_torch.get_decomp_table())
    coreai_torch.TorchConverter().add_exported_program(ep).to_coreai().save_asset(tmp_path / "kv.aimodel")
    program = anefx.load(tmp_path / "kv.aimodel")
    (state_name,) = program.states()
    state = program.make_state()
    reference = KVWrite().eval()
    reference.load_state_dict(model.state_dict())
    reference.k_cache.zero_()
    for position in (2, 5, 2):
        x = torch.randn(1, 1, 4)
        (out,) = program({"x": x, "pos": [position]}, state=state).values()
        with torch.no_grad():
            want = reference(x, torch.tensor([position]))
        np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[state_name], reference.k_cache.numpy(), rtol=1e-5, atol=1e-6)
    assert not program.make_state()[state_name].any()
    with pytest.raises(anefx.AnefxError, match="make_state"):
        program({"x": x, "pos": [0]})
    program.close()
