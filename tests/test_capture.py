import pytest
import torch
from torch import nn

import anefx
from anefx.ir.errors import CaptureError
from helpers import example


def test_canonical_graph_is_aten_with_shapes():
    model, args, kwargs = example("encoder_layer")
    cap = anefx.capture(model, args, kwargs)
    gm = cap.graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls, "graph has no ops"
    for n in calls:
        assert "val" in n.meta, f"{n.name} lacks shape metadata"
        assert not isinstance(n.target, type(nn.Linear.forward))
    assert any(n.target == torch.ops.aten.linear.default for n in calls)
    assert cap.input_names == ["x"]
    assert cap.output_names == ["output"]
    out = gm(*args)
    torch.testing.assert_close(out, model(*args))


def test_accepts_symbolic_trace_graph_module():
    model, args, _ = example("mlp")
    traced = torch.fx.symbolic_trace(model)
    cap = anefx.capture(traced, args)
    assert any(n.target == torch.ops.aten.linear.default for n in cap.graph_module.graph.nodes)
    torch.testing.assert_close(cap.graph_module(*args), model(*args))


def test_accepts_exported_program_and_kwargs():
    model, args, kwargs = example("distilbert_small")
    ep = torch.export.export(model, args, kwargs, strict=False)
    cap = anefx.capture(ep, args, kwargs)
    assert cap.input_names == ["input_ids", "attention_mask"]
    assert cap.output_names == ["last_hidden_state"]


def test_nested_outputs_get_readable_names():
    class TwoHeads(nn.Module):
        def forward(self, x):
            return {"logits": x * 2, "aux": (x + 1, x - 1)}

    cap = anefx.capture(TwoHeads(), (torch.randn(2, 3),))
    assert cap.output_names == ["logits", "aux_0", "aux_1"]


def test_data_dependent_control_flow_is_named():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # depends on the values
                return x * 2
            return x - 1

    with pytest.raises(CaptureError, match="data-dependent control flow") as info:
        anefx.capture(Branchy(), (torch.randn(3),))
    assert "torch.cond" in str(info.value)


def test_inputs_that_do_not_fit():
    model, _, _ = example("mlp")
    with pytest.raises(CaptureError, match=r"do not fit.*float32\[4, 10\]"):
        anefx.capture(model, (torch.randn(4, 10),))


def test_bad_input_types_and_dynamic_shapes():
    model, args, _ = example("mlp")
    with pytest.raises(CaptureError, match="tuple of tensors"):
        anefx.capture(model, "not a tensor")
    with pytest.raises(TypeError, match="dynamic_shapes"):  # static shapes only: no such parameter
        anefx.capture(model, args, dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    with pytest.raises(CaptureError, match=r"wrap it in an nn\.Module"):
        anefx.capture(lambda x: x, args)


def test_model_is_not_modified_and_training_flag_restored():
    model, args, _ = example("mlp_block")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anefx.capture(model, args)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
