"""The compatibility seams (``anefx/compat/``): the behaviour anefx relies on from each private API.

A torch, coremltools or coreai upgrade that changes one of these fails here, by name, rather than
deep inside a pass or a target. Every private use in anefx goes through these modules (checked by
the grep test at the end).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from anefx.compat import coremltools as ctc
from anefx.compat import torch as tc

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


class _TwoIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x, *, y):
        return {"out": self.lin(x) * self.scale + y, "x": x}


def _exported_module():
    m = _TwoIn()
    args, kwargs = (torch.randn(2, 4),), {"y": torch.randn(2, 3)}
    return m, args, kwargs, torch.export.export(m, args, kwargs, strict=False).module()


# -- torch --------------------------------------------------------------------------------------


def test_pytree_flattens_args_and_kwargs_in_placeholder_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    leaves, spec = tc.tree_flatten(((a,), {"z": c, "y": b}))
    assert [float(t) for t in leaves] == [0.0, 2.0, 1.0]  # dict keys in insertion order
    assert tc.tree_unflatten(leaves, spec)[1]["y"] is b
    paths, _ = tc.tree_flatten_with_path({"logits": a, "hidden": (b,)})
    assert [[getattr(k, "key", getattr(k, "idx", None)) for k in p] for p, _ in paths] == [["logits"], ["hidden", 0]]
    assert tc.tree_leaves([a, {"k": (b, None)}]) == [a, b, None]


def test_pytree_info_maps_flat_placeholders_to_the_calling_convention():
    m, args, kwargs, gm = _exported_module()
    info = tc.pytree_info(gm.graph)
    assert info is not None and info.in_spec is not None and info.out_spec is not None
    call_args, call_kwargs = tc.tree_unflatten([*args, kwargs["y"]], info.in_spec)
    assert set(call_kwargs) == {"y"}
    assert torch.equal(gm(*call_args, **call_kwargs)["out"], m(*args, **kwargs)["out"])
    assert tc.pytree_info(torch.fx.symbolic_trace(torch.nn.ReLU()).graph) is None


def test_set_flat_io_returns_the_output_nodes_as_a_tuple():
    _, args, kwargs, exported = _exported_module()
    gm = torch.fx.GraphModule(exported, exported.graph)  # without export's input-checking hook
    tc.set_flat_io(gm.graph)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(tc.tree_leaves(out.args[0])),)
    gm.recompile()
    got = gm(*args, kwargs["y"])  # flat placeholders, flat outputs
    assert isinstance(got, tuple) and len(got) == 2 and tc.pytree_info(gm.graph) is None


def test_rename_node_renames_a_node_in_its_graph():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    tc.rename_node(node, "pixels")
    gm.recompile()
    assert node.name == "pixels" and "relu(pixels" in gm.code
    with gm.graph.inserting_after(node):  # the graph's namespace knows the new name
        assert gm.graph.call_function(torch.relu, (node,), name="pixels").name != "pixels"


def test_fake_modes_are_made_and_detected():
    mode = tc.fake_mode()
    fake = mode.from_tensor(torch.randn(2, 3))
    assert tuple(fake.shape) == (2, 3) and tc.detect_fake_mode([fake, 1.0]) is mode
    assert tc.detect_fake_mode([torch.randn(1)]) is None


def test_operator_schemas():
    assert tc.is_op_overload(aten.add_.Tensor) and not tc.is_op_overload(aten.add_)
    assert tc.is_op_packet(aten.add) and not tc.is_op_packet(aten.add.Tensor)
    schema = tc.op_schema(aten.add_.Tensor)
    assert schema.name == "aten::add_" and schema.arguments[0].alias_info.is_write
    assert tc.op_schema(aten.view.default).returns[0].alias_info is not None  # a view aliases its input
    assert tc.op_schema(aten.relu.default).returns[0].alias_info is None
    assert tc.overload_name(aten.add.Tensor) == "Tensor" and tc.packet_name(aten.add) == "aten::add"


def test_non_persistent_buffers():
    assert tc.non_persistent_buffers(_TwoIn()) == {"scale"}
    assert tc.non_persistent_buffers(torch.nn.BatchNorm1d(3)) == set()


def test_exported_program_built_from_a_graph_runs_and_verifies():
    from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument

    graph = torch.fx.Graph()
    w = graph.placeholder("p_w")
    x = graph.placeholder("x")
    y = graph.call_function(aten.mul.Tensor, (x, w))
    graph.output((y,))
    weight = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    mode = tc.fake_mode()
    for node, t in ((w, weight), (x, torch.randn(3))):
        node.meta["val"] = mode.from_tensor(t)
    with mode:
        y.meta["val"] = w.meta["val"] * x.meta["val"]
    root = torch.nn.Module()
    inputs = [
        InputSpec(InputKind.PARAMETER, TensorArgument("p_w"), "w"),
        InputSpec(InputKind.USER_INPUT, TensorArgument("x"), None),
    ]
    outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(y.name), None)]
    _, in_spec = tc.tree_flatten(((torch.zeros(3),), {}))
    _, out_spec = tc.tree_flatten((torch.zeros(3),))
    ep = tc.exported_program(root, graph, inputs, outputs, {"w": weight}, {}, in_spec, out_spec)
    x = torch.randn(3)
    with torch.no_grad():
        assert torch.equal(ep.module()(x)[0], x * weight)
    with pytest.raises(Exception, match=r"p_w|placeholder|input"):  # torch verifies the signature
        tc.exported_program(root, graph, inputs[1:], outputs, {}, {}, in_spec, out_spec)


def test_dynamo_marks_lifted_parameters_as_static_inputs():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(tc.is_dynamo_static_input(n) for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    torch._dynamo.reset()
    lin = torch.nn.Linear(4, 2)
    torch.compile(lin, backend=backend, dynamic=False)(torch.randn(1, 4))
    assert sorted(seen) == [False, True, True]  # the input; the weight and the bias


# -- coremltools --------------------------------------------------------------------------------


def test_mil_program_of_a_converted_model():
    import coremltools as ct

    from anefx.targets.coreml import quiet_coremltools

    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    ep = torch.export.export(m, (torch.randn(1, 8),)).run_decompositions({})
    with quiet_coremltools():
        mlmodel = ct.convert(ep, convert_to="mlprogram", skip_model_load=True)
    types = [op.op_type for op in ctc.operations(mlmodel)]
    assert "linear" in types and "relu" in types
    assert list(ctc.mil_program(mlmodel).functions) == ["main"]
    with pytest.raises(AttributeError, match="no MIL program"):
        ctc.mil_program(object())
    # released: the weights leave memory, the program is read back from the model's own package
    weight = next(op for op in ctc.operations(mlmodel) if op.op_type == "const" and np.size(op.outputs[0].val) == 32)
    ctc.drop_in_memory_program(mlmodel)
    assert mlmodel._mil_program is None
    again = ctc.operations(mlmodel)
    assert [op.op_type for op in again] == types
    back = next(op for op in again if op.name == weight.name)
    np.testing.assert_array_equal(back.outputs[0].val, weight.outputs[0].val)
    # read once: repeated asks (op histograms, the ANE report) reuse it; another released model's
    # read replaces it (one read-back program in memory at a time)
    assert ctc.mil_program(mlmodel) is ctc.mil_program(mlmodel)
    with quiet_coremltools():
        other = ct.convert(ep, convert_to="mlprogram", skip_model_load=True)
    ctc.drop_in_memory_program(other)
    first = ctc.mil_program(mlmodel)
    assert ctc.mil_program(other) is not first and ctc.mil_program(other) is ctc.mil_program(other)
    assert ctc.mil_program(mlmodel) is not first  # read again: the other one replaced it
    ctc.forget_read_back()


def test_program_from_spec_of_a_saved_package(tmp_path):
    """A saved package's protobuf and weights back into a MIL program: functions, weights, the
    defaults of optional inputs filled in, a state write read back as ``coreml_update_state``."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from anefx.targets.coreml import quiet_coremltools

    weight = np.arange(12, dtype=np.float16).reshape(3, 4)

    @mb.program(
        input_specs=[mb.StateTensorSpec((1, 3), dtype=types.fp16), mb.TensorSpec((1, 4), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(acc, x):
        y = mb.softmax(x=mb.linear(x=x, weight=weight))
        mb.coreml_update_state(state=acc, value=mb.add(x=mb.read_state(input=acc), y=y))
        return y

    with quiet_coremltools():
        model = ct.convert(
            prog, convert_to="mlprogram", skip_model_load=True, minimum_deployment_target=ct.target.iOS18
        )
    model.save(str(tmp_path / "m.mlpackage"))
    spec = ct.utils.load_spec(str(tmp_path / "m.mlpackage"))
    program = ctc.program_from_spec(spec, str(tmp_path / "m.mlpackage" / "Data" / "com.apple.CoreML" / "weights"))
    ops = {op.op_type: op for op in program.functions["main"].operations}
    assert list(program.functions) == ["main"]
    assert int(ops["softmax"].inputs["axis"].val) == -1  # the op definition's default, filled in
    assert ops["linear"].inputs["weight"].val.dtype == np.float16
    assert "coreml_update_state" in ops and "read_state" in ops and "write_state" not in ops


def test_kmeans_lut_and_indices():
    values = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
    lut, indices = ctc.kmeans_lut_and_indices(values, 4)
    # one (16, 1) table for the group, indices flat over its elements (what lut_function returns)
    assert lut.shape == (16, 1) and indices.shape == (values.size,) and int(indices.max()) < 16
    rebuilt = lut.reshape(-1)[indices.astype(np.int64)].reshape(values.shape)
    assert float(np.abs(rebuilt - values).max()) < 0.5  # 16 levels over a unit Gaussian


def test_pass_options_read_back_what_was_set():
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    assert ctc.pass_options(pipeline) == {}  # the default sets none (anefx copies whatever it has)
    pipeline.set_options("common::const_elimination", {"skip_const_by_size": "1e6"})
    assert ctc.pass_options(pipeline) == {"common::const_elimination": {"skip_const_by_size": "1e6"}}
    assert ctc.pass_options(ct.PassPipeline.DEFAULT) == {}  # each DEFAULT is a fresh copy


def test_fp16_cast_pass_has_an_overridable_overflow_check():
    cls = ctc.fp16_cast_pass()
    assert isinstance(cls.__dict__.get("fp16_overflow"), staticmethod)


def test_inplace_pattern_pass_places_writes_from_a_list_of_ops():
    import inspect

    cls = ctc.inplace_pattern_pass()
    method = cls.__dict__["_try_match_and_transform_pattern"]
    assert list(inspect.signature(method).parameters) == ["self", "op", "block", "block_operation_list"]
    assert "block_operation_list.index(op) + 1" in inspect.getsource(method)  # the stale list anefx replaces


def test_names_apart_skips_the_taken_names_and_restores_the_counter():
    from coremltools.converters.mil.mil.builder import Builder

    original = Builder.__dict__["_get_free_name"]
    Builder.name_count["anefx_probe"] = 0
    with ctc.names_apart(["anefx_probe_0", "anefx_probe_2"]):
        # anefx_probe_0 taken, anefx_probe_1 free, anefx_probe_2 taken, anefx_probe_3 free
        assert [Builder._get_free_name("anefx_probe") for _ in range(2)] == ["anefx_probe_1", "anefx_probe_3"]
    assert Builder.__dict__["_get_free_name"] is original
    assert Builder._get_free_name("anefx_probe") == "anefx_probe_4"


def test_names_apart_names_a_nodes_value_op_after_the_node():
    """coremltools' ``linear`` converter names only the value after the node (``res.name = node.name``)
    and registers it with ``TranscriptionContext.add(var, torch_name=…)``; ``names_apart`` renames the
    op there (the signature it wraps, and the restore)."""
    import inspect

    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.converter import TranscriptionContext

    original = TranscriptionContext.__dict__["add"]
    assert list(inspect.signature(original).parameters) == ["self", "ssa_var", "torch_name", "override"]
    assert "res.name = node.name" in inspect.getsource(ops.linear)  # the op itself keeps a made-up name
    with ctc.names_apart(["linear"]):
        assert TranscriptionContext.__dict__["add"] is not original
    assert TranscriptionContext.__dict__["add"] is original


def test_torch_node_inputs_is_what_op_converters_call():
    import inspect

    from coremltools.converters.mil.frontend.torch import ops

    assert list(inspect.signature(ops._get_inputs).parameters)[:3] == ["context", "node", "expected"]
    from anefx.targets.coreml import _convert_channel_layer_norm  # uses ctc.torch_node_inputs

    assert "torch_node_inputs" in inspect.getsource(_convert_channel_layer_norm)


# -- coreai -------------------------------------------------------------------------------------


def test_coreai_function_graph_walk():
    from anefx.targets import coreai

    if not coreai.available()[0]:
        pytest.skip(coreai.available()[1])
    import coreai_torch

    from anefx.compat import coreai as cac

    m = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU()).eval()
    ep = torch.export.export(m, (torch.randn(1, 4, 2, 2),)).run_decompositions(coreai_torch.get_decomp_table())
    program = coreai_torch.TorchConverter().add_exported_program(ep).to_coreai()
    names = []
    cac.walk(program, lambda op: names.append(op.name))
    assert "coreai.conv2d" in names and len(names) > 2
    assert "conv2d" in cac.function_graph(program).get_asm(large_elements_limit=4)


# -- the seam is the only place -----------------------------------------------------------------

PRIVATE = r"_mil_program|_get_lut_and_indices|_pass_options|_codegen|_get_inputs|\._rename\(|torch\._[a-z]|_pytree|" + (
    r"_non_persistent_buffers_set|_dynamo_static_input_type|_get_graph|coreai\._|_overloadname|\._schema\b|_qualified_op"
)


def test_private_apis_are_used_in_the_compat_modules_only():
    out = subprocess.run(["grep", "-rnE", PRIVATE, "anefx/"], cwd=ROOT, capture_output=True, text=True).stdout
    outside = [line for line in out.splitlines() if not line.startswith("anefx/compat/") and "ops.aten" not in line]
    assert not outside, "\n".join(outside)
    assert re.search(r"anefx/compat/coremltools.py:\d+:.*_mil_program", out)
