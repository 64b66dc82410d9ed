"""Issue 3's done-when, measured on the Core ML program's MIL ops."""

import pytest

import anefx
from anefx.driver.validate import run_flat
from helpers import example


def _rel(compiled, cap_inputs=None):
    cap = compiled.captured
    out = run_flat(compiled.graph_module, cap.flat_inputs)
    return max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(out, cap.reference_outputs) if b.is_floating_point()
    )


_PASS_THROUGH = {"cast", "squeeze", "expand_dims"}


def _walk_back(var, stop_at=None):
    """Follow a MIL variable up through layout-neutral ops; return the name where the walk stops."""
    while var.op is not None and var.op.op_type in _PASS_THROUGH and var.op.op_type != stop_at:
        var = var.op.inputs["x"]
    return var.name


# The passes' own output (never_worse=False): on these small models whose input and output are
# (B, S, C), the convs cost a transpose in and one out where the stock linears cost none, so the
# default compile keeps them as they are (tests/test_never_worse.py).
PROJECTIONS = {  # model -> number of projections (each must become one conv)
    "mlp": 2,
    "mlp_block": 2,
    "encoder_layer": 6,
    "param_matmul": 2,
    "grouped_projection": 1,
    "nin": 4,
}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_every_projection_is_a_conv(name):
    model, args, kwargs = example(name)
    compiled = anefx.compile(model, args, kwargs, never_worse=False)
    ops = compiled.op_histogram()
    assert ops.get("linear", 0) == 0, ops
    assert ops["conv"] == PROJECTIONS[name], ops
    assert _rel(compiled) < 1e-5
    assert not compiled.report.rolled_back


def test_mlp_without_bias():
    model, args, _ = example("mlp", bias=False)
    compiled = anefx.compile(model, args)
    assert compiled.op_histogram()["conv"] == 2 and "linear" not in compiled.op_histogram()
    assert _rel(compiled) < 1e-5


@pytest.mark.parametrize("n", [1, 12])
def test_block_stack_has_one_layout_change_each_way(n):
    model, args, _ = example("block_stack", n=n)
    compiled = anefx.compile(model, args, never_worse=False)  # the passes' own output (see PROJECTIONS)
    ops = compiled.op_histogram()
    assert ops["transpose"] == 2 and ops.get("reshape", 0) == 0 and ops["conv"] == 2 * n, ops
    main = compiled.artifact.package.mil_program.functions["main"]
    transposes = [op for op in main.operations if op.op_type == "transpose"]
    # the first transpose reads the model input, the last one produces the model output
    # (through nothing but casts, squeeze and expand_dims)
    assert _walk_back(transposes[0].inputs["x"]) in {v.name for v in main.inputs.values()}
    assert _walk_back(main.outputs[0], stop_at="transpose") == transposes[1].outputs[0].name
    assert _rel(compiled) < 1e-5


def test_default_pipeline_is_idempotent():
    model, args, _ = example("encoder_layer")
    compiled = anefx.compile(model, args, convert=False)
    cap = compiled.captured
    again = anefx.Pipeline.default().run(compiled.graph_module, cap.flat_inputs)
    assert not [r.name for r in again.records if r.modified]
