"""torch.compile(model, backend="anefx")."""

import importlib.metadata

import pytest
import torch
from torch import nn

import anefx
from helpers import example


def setup_function():
    torch._dynamo.reset()


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "anefx" in {ep.name for ep in eps}
    assert "anefx" in torch._dynamo.list_backends()


def test_mlp_matches_eager_by_name():
    model, args, _ = example("mlp_block")
    compiled = torch.compile(model, backend="anefx")
    torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)


class WithBreak(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(torch.relu(y))


def test_graph_break_compiles_each_graph_and_saves(tmp_path):
    model = WithBreak().eval()
    x = torch.randn(2, 3, 8)
    b = anefx.backend(save_dir=tmp_path, never_worse=False)  # one isolated linear: the guard would keep it
    out = torch.compile(model, backend=b)(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert len(b.compiled) == 2
    for c in b.compiled:
        assert c.report.record("linear_to_conv").stats["converted"] == 1  # lifted weights are constants again
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["graph_0.mlpackage", "graph_0.report.json", "graph_1.mlpackage", "graph_1.report.json"]


def test_small_transformers_model():
    model, args, kwargs = example("distilbert_small", pad=4)
    b = anefx.backend()
    out = torch.compile(model, backend=b)(*args, **kwargs)
    torch.testing.assert_close(out.last_hidden_state, model(*args, **kwargs).last_hidden_state, atol=1e-4, rtol=1e-4)
    assert any(c.report.record("attention_bc1s").modified for c in b.compiled)


def test_new_shapes_recompile():
    model, _, _ = example("mlp_block")
    b = anefx.backend()
    compiled = torch.compile(model, backend=b, dynamic=False)
    for seq in (4, 7):
        x = torch.randn(2, seq, 64)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(b.compiled) == 2
    shapes = [c.captured.flat_inputs[0].shape[1] for c in b.compiled]
    assert shapes == [4, 7]


def test_model_is_not_modified():
    model, args, _ = example("mlp_block")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.compile(model, backend="anefx")(*args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_any_exception_inside_anefx_falls_back_to_eager_with_one_warning(monkeypatch):
    """A bug in anefx (not an AnefxError) must not break the user's program: eager, one warning."""

    def planted(*args, **kwargs):
        raise ZeroDivisionError("planted failure in the pipeline")

    monkeypatch.setattr(anefx.Pipeline, "run", planted)
    model, args, _ = example("mlp_block")
    b = anefx.backend()
    with pytest.warns(UserWarning) as caught:
        out = torch.compile(model, backend=b)(*args)
    torch.testing.assert_close(out, model(*args))
    ours = [w for w in caught if "anefx" in str(w.message)]
    assert len(ours) == 1
    assert "ZeroDivisionError" in str(ours[0].message) and "planted failure" in str(ours[0].message)
    assert b.compiled == []


def test_rewritten_graph_failing_at_run_time_falls_back_to_eager(monkeypatch):
    model, args, _ = example("mlp_block")
    b = anefx.backend()
    compiled = torch.compile(model, backend=b)
    compiled(*args)
    gm = b.compiled[0].graph_module

    def planted(*a, **k):
        raise RuntimeError("planted run-time failure")

    monkeypatch.setattr(gm, "forward", planted)
    with pytest.warns(UserWarning, match="RuntimeError inside anefx: planted run-time failure"):
        out = compiled(*args)
    torch.testing.assert_close(out, model(*args))
