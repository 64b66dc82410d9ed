"""The Core AI hand-off (``target="coreai"``, optional extra ``anefx[coreai]``)."""

import inspect
import sys

import pytest

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
    convs = [op for op in compiled.artifact.package.ops if op.name == "conv2d"]
    forward = inspect.getsource(models.MLP.forward).splitlines()
    line = inspect.getsourcelines(models.MLP.forward)[1] + next(i for i, t in enumerate(forward) if "self.fc2(" in t)
    assert convs and all(op.location and op.location.endswith(f"models.py:{line}") for op in convs)
    assert "coreai.conv2d" in compiled.artifact.package.ir_text()


@needs_coreai
def test_full_size_distilbert():
    model, args, kwargs = example("distilbert")
    compiled = anefx.compile(model, args, kwargs, target="coreai")
    ops = compiled.op_histogram()
    assert ops["conv2d"] == 36
    # attention is the only matmul-like work left: 2 per head (coreai-torch decomposes einsum to bmm)
    assert ops["decomposable.broadcasting_batch_matmul"] == 2 * 12 * 6
    assert ops["transpose"] == 8  # as in the Core ML program
    assert not compiled.report.rolled_back


@pytest.mark.skipif(not coreai.runtime_available()[0], reason=coreai.runtime_available()[1])
def test_runtime_loads_the_model(tmp_path):  # pragma: no cover - Apple's OS only
    from coreai.runtime import AIModel

    model, args, _ = example("mlp")
    path = anefx.compile(model, args, target="coreai").save(tmp_path / "m.aimodel")
    assert AIModel.load(path) is not None
