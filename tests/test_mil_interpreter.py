"""The MIL interpreter on small programs written with coremltools' Builder and saved as packages:
fp16 behaviour, states, control flow, unknown ops, the loader, and the coremltools behaviour it pins."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import anefx
from anefx.compat.coremltools import coremltools_module
from anefx.targets.coreml import CoreMLOptions
from anefx.targets.mil import MILProgram, UnsupportedOpError

ct = coremltools_module()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402


def _save(program_or_model, path, precision="float32", target=None, **kwargs):
    """``ct.convert`` (a MIL program or a torch ExportedProgram) → a saved ``.mlpackage``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(
            program_or_model,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32 if precision == "float32" else ct.precision.FLOAT16,
            minimum_deployment_target=target or ct.target.iOS17,
            skip_model_load=True,
            **kwargs,
        )
    model.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# fp16 as the device stores it
# ---------------------------------------------------------------------------------------------


class Square(torch.nn.Module):
    def forward(self, x):
        return (x * x) / 512.0 + 0.0001


@pytest.fixture(scope="module")
def square_programs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("square")
    ep = torch.export.export(Square().eval(), (torch.ones(4),)).run_decompositions({})
    return {p: anefx.load(_save(ep, tmp / f"{p}.mlpackage", precision=p)) for p in ("float16", "float32")}


def test_fp16_overflows_where_the_program_stores_fp16(square_programs):
    """x·x for x = 300 is 90,000: beyond fp16's 65,504, so the fp16 program's intermediate is inf;
    the fp32 program (same ops) stays finite."""
    x = np.array([1.0, 200.0, 255.0, 300.0], np.float32)
    half = square_programs["float16"]({"x": x})
    full = square_programs["float32"]({"x": x})
    (h,), (f,) = half.values(), full.values()
    assert h.dtype == np.float16 and f.dtype == np.float32
    np.testing.assert_allclose(f, x * x / 512 + 1e-4, rtol=1e-6)
    assert np.isfinite(h[:3]).all() and np.isinf(h[3])  # 255² = 65,025 still fits
    assert np.isfinite(f).all()


def test_fp16_rounds_each_stored_value(square_programs):
    """1/512 + 0.0001 in fp16: 1/512 is exact, the sum rounds to the nearest fp16 (0.0021 → 0.002102…);
    fp32 keeps 0.0020531…"""
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    (h,) = square_programs["float16"]({"x": x}).values()
    expected = (np.float16(np.float16(x * x) / np.float16(512)) + np.float16(1e-4)).astype(np.float16)
    np.testing.assert_array_equal(h, expected)
    (f,) = square_programs["float32"]({"x": x}).values()
    assert not np.array_equal(f.astype(np.float16).astype(np.float32), f)  # fp32 values are not fp16 values


# ---------------------------------------------------------------------------------------------
# states, control flow, unknown ops
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accumulator(tmp_path_factory):
    """``acc += x`` on an fp16 state, returning the new value (iOS18 states)."""

    @mb.program(
        input_specs=[mb.StateTensorSpec((1, 4), dtype=types.fp16), mb.TensorSpec((1, 4), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(acc, x):
        new = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=new)
        return mb.mul(x=new, y=np.float16(2.0))

    path = tmp_path_factory.mktemp("acc") / "acc.mlpackage"
    return anefx.load(_save(prog, path, precision="float16", target=ct.target.iOS18))


def test_states_are_carried_across_calls(accumulator):
    assert list(accumulator.states()) == ["acc"] and list(accumulator.inputs()) == ["x"]
    state = accumulator.make_state()
    np.testing.assert_array_equal(state["acc"], np.zeros((1, 4), np.float16))
    x = np.array([[1, 2, 3, 4]], np.float16)
    for step in range(1, 4):
        (out,) = accumulator({"x": x}, state=state).values()
        np.testing.assert_array_equal(out, 2 * step * x)
    np.testing.assert_array_equal(state["acc"], 3 * x)
    state["acc"] = np.full((1, 4), 10, np.float16)  # written through the interface
    (out,) = accumulator({"x": x}, state=state).values()
    np.testing.assert_array_equal(out, 2 * (10 + x))
    fresh = accumulator.make_state()
    (out,) = accumulator({"x": x}, state=fresh).values()
    np.testing.assert_array_equal(out, 2 * x)  # a new state starts from zeros; the old one is untouched
    np.testing.assert_array_equal(state["acc"], 10 + x)


def test_a_stateful_function_without_a_state_is_refused(accumulator):
    with pytest.raises(anefx.AnefxError, match=r"make_state\('main'\)"):
        accumulator({"x": np.ones((1, 4), np.float16)})


@pytest.fixture(scope="module")
def control_flow(tmp_path_factory):
    """``y = 2x if sum(x) > 0 else x - 1``, then ``acc = n · y`` by a while loop."""

    @mb.program(
        input_specs=[mb.TensorSpec((2,)), mb.TensorSpec((1,), dtype=types.int32)], opset_version=ct.target.iOS17
    )
    def prog(x, n):
        pred = mb.greater(x=mb.reduce_sum(x=x, axes=[0]), y=0.0, name="positive")
        y = mb.cond(pred=pred, _true_fn=lambda: mb.mul(x=x, y=2.0), _false_fn=lambda: mb.sub(x=x, y=1.0), name="branch")
        start = mb.cast(x=mb.mul(x=n, y=0), dtype="int32")
        _, acc = mb.while_loop(
            _cond=lambda i, acc: mb.less(x=i, y=n),
            _body=lambda i, acc: (mb.add(x=i, y=1), mb.add(x=acc, y=y)),
            loop_vars=(start, mb.mul(x=x, y=0.0)),
            name="loop",
        )
        return acc

    return anefx.load(_save(prog, tmp_path_factory.mktemp("cf") / "cf.mlpackage"))


@pytest.mark.parametrize(
    ("x", "n", "expected"),
    [([1, 2], 3, [6, 12]), ([-1, -2], 3, [-6, -9]), ([1, 2], 0, [0, 0]), ([0.5, -3], 1, [-0.5, -4])],
)
def test_cond_and_while_loop(control_flow, x, n, expected):
    (out,) = control_flow({"x": np.array(x, np.float32), "n": np.array([n], np.int32)}).values()
    np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_an_unknown_op_fails_the_load_naming_the_op_function_and_position(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 1, 4, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        y = mb.relu(x=x)
        return mb.space_to_batch(x=y, block_shape=np.array([2, 2], np.int32), paddings=np.zeros((2, 2), np.int32))

    path = _save(prog, tmp_path / "s2b.mlpackage")
    with pytest.raises(UnsupportedOpError) as info:
        anefx.load(path)
    message = str(info.value)
    assert "'space_to_batch'" in message and "function 'main'" in message and "op #" in message
    assert "never skips" in message


def test_bad_inputs_are_explained(accumulator, control_flow):
    state = accumulator.make_state()
    with pytest.raises(anefx.AnefxError, match=r"'x' has shape \(4,\); the program wants 1x4"):
        accumulator({"x": np.ones(4)}, state=state)
    with pytest.raises(anefx.AnefxError, match=r"missing \['n'\]"):
        control_flow({"x": np.ones(2, np.float32)})
    with pytest.raises(anefx.AnefxError, match="integers"):
        control_flow({"x": np.ones(2, np.float32), "n": np.array([1.5])})
    with pytest.raises(anefx.AnefxError, match="no function 'decode'"):
        control_flow({"x": np.ones(2, np.float32), "n": [1]}, function="decode")
    with pytest.raises(anefx.AnefxError, match=r"not an \.mlpackage"):
        anefx.load(control_flow.source + "/Data")
    with pytest.raises(anefx.AnefxError, match="no such file"):
        anefx.load("nowhere.mlpackage")


def test_outputs_are_the_callers_to_modify(tmp_path):
    """An output that is a tensor the interpreter holds (here an int32 input passed through unchanged)
    is handed out as a copy: writing into it changes neither the caller's input nor the program."""

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.int32)], opset_version=ct.target.iOS17)
    def prog(ids):
        return mb.identity(x=ids)

    program = anefx.load(_save(prog, tmp_path / "identity.mlpackage"))
    ids = np.arange(4, dtype=np.int32).reshape(1, 4)
    (out,) = program({"ids": ids}).values()
    out[...] = 100
    np.testing.assert_array_equal(ids, np.arange(4).reshape(1, 4))


def test_core_ml_itself_runs_on_macos_only(control_flow):
    from anefx.targets.coreml import runtime_available

    if runtime_available()[0]:  # pragma: no cover - macOS
        program = anefx.load(control_flow.source, runtime="coreml")
        feed = {"x": np.array([1, 2], np.float32), "n": np.array([3], np.int32)}
        np.testing.assert_array_equal(next(iter(program(feed).values())), next(iter(control_flow(feed).values())))
        return
    with pytest.raises(anefx.TargetUnavailableError, match="needs macOS"):
        anefx.load(control_flow.source, runtime="coreml")
    pytest.skip(f"Core ML runtime: {runtime_available()[1]}")


def test_run_steps_yields_each_op_with_its_values_live_and_frees_them_after_their_last_read(control_flow):
    feed = {"x": torch.tensor([1.0, 2.0]), "n": torch.tensor([2], dtype=torch.int32)}
    values, live_names = {}, {}
    for op, live in control_flow.run_steps(feed):
        assert all(name in live for name in op.inputs + op.outputs)  # what it read is still live
        values.update({name: live[name] for name in op.outputs})
        live_names[op.name] = set(live)
    assert [op.name for op in control_flow.operations()] == list(live_names)
    assert torch.equal(values["branch"], torch.tensor([2.0, 4.0]))
    assert torch.equal(values["loop_1"], torch.tensor([4.0, 8.0]))
    assert bool(values["positive"])
    # the sum is read by 'positive' only, the predicate by 'branch' only: freed after them
    total = next(op for op in control_flow.operations() if op.name == "positive").inputs[0]
    assert total in live_names["positive"] and total not in live_names["branch"]
    after_branch = list(live_names)[list(live_names).index("branch") + 1]
    assert "positive" in live_names["branch"] and "positive" not in live_names[after_branch]


# ---------------------------------------------------------------------------------------------
# what the reader relies on in coremltools (pinned: an upgrade that changes it fails here)
# ---------------------------------------------------------------------------------------------


def test_coremltools_reader_behaviour_is_pinned(accumulator, tmp_path):
    from anefx.targets.mil.reader import read_package

    # milproto fills optional inputs with the op definitions' defaults
    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.softmax(x=x)

    read = read_package(_save(prog, tmp_path / "softmax.mlpackage"))
    (op,) = [o for o in read.program.functions["main"].operations if o.op_type == "softmax"]
    assert int(op.inputs["axis"].val) == -1
    # a state write is read back as coreml_update_state (the proto's write_state) after read_state
    read = read_package(accumulator.source)
    ops = [o.op_type for o in read.program.functions["main"].operations if o.op_type != "const"]
    assert ops == ["read_state", "add", "coreml_update_state", "mul"]
    assert read.functions["main"].states["acc"].dtype == np.float16


def test_an_in_memory_mlmodel_runs_from_its_staged_package(tmp_path):
    """``anefx.load(mlmodel)`` runs the package ``ct.convert`` staged: the bytes ``save`` writes."""
    ep = torch.export.export(Square().eval(), (torch.ones(4),)).run_decompositions({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(ep, convert_to="mlprogram", skip_model_load=True, minimum_deployment_target=ct.target.iOS17)
    program = anefx.load(model)
    assert isinstance(program, MILProgram)
    x = np.array([1, 2, 3, 4], np.float32)
    model.save(str(tmp_path / "saved.mlpackage"))
    np.testing.assert_array_equal(
        next(iter(program({"x": x}).values())), next(iter(anefx.load(tmp_path / "saved.mlpackage")({"x": x}).values()))
    )


# ---------------------------------------------------------------------------------------------
# ops that coremltools gives no numpy semantics for: through ct.convert of PyTorch layers
# ---------------------------------------------------------------------------------------------


class Layers(torch.nn.Module):
    """PyTorch layers that coremltools converts to MIL ops without a ``value_inference``: batch_norm,
    instance_norm, conv_transpose (+ crop), strided conv, avg / max pool (padding, ceil mode, padding
    excluded from the average), upsample nearest / bilinear, pad reflect / replicate, pixel_shuffle."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.bn, self.inorm = nn.BatchNorm2d(4), nn.InstanceNorm2d(4, affine=True)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.conv, self.gn = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=gen))
            self.bn.running_mean.normal_(generator=gen)
            self.bn.running_var.uniform_(0.5, 2, generator=gen)

    def forward(self, x):
        F = torch.nn.functional
        y = self.gn(self.conv(self.up(self.inorm(self.bn(x)))))
        a = F.avg_pool2d(y, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        b = F.max_pool2d(y, 3, stride=2, padding=1, ceil_mode=True)
        c = F.interpolate(a, scale_factor=2, mode="nearest") + F.interpolate(b, scale_factor=2, mode="bilinear")
        d = F.interpolate(c, size=(7, 9), mode="bilinear", align_corners=True)
        e = F.pad(d, (1, 2, 2, 1), mode="reflect") + F.pad(d, (1, 2, 2, 1), mode="replicate")
        return e * 1.0, F.pixel_shuffle(e[:, :8, :8, :8], 2), torch.topk(e.flatten(1), 5)[0]


def test_layers_without_numpy_semantics_match_eager(tmp_path):
    model, x = Layers().eval(), torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        ep = torch.export.export(model, (x,)).run_decompositions({})
    program = anefx.load(_save(ep, tmp_path / "layers.mlpackage"))
    ops = program.op_counts["main"]
    for op in ("batch_norm", "instance_norm", "conv_transpose", "avg_pool", "max_pool", "pad", "pixel_shuffle"):
        assert ops.get(op), (op, ops)
    assert ops.get("upsample_bilinear") and ops.get("upsample_nearest_neighbor")
    outs = program({"x": x})
    for (name, got), w in zip(outs.items(), want):
        assert got.shape == tuple(w.shape), name
        # a chain of 14 ops in float32: 5e-5 of the output's scale (a wrong semantics is O(1))
        assert np.abs(got - w.numpy()).max() <= 5e-5 * float(w.abs().max()), name


class Recurrent(torch.nn.Module):
    def __init__(self, **lstm):
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 5, **lstm)

    def forward(self, x):  # (coremltools converts one LSTM per graph, whose final states are not read)
        return self.lstm(x)[0]


@pytest.mark.parametrize("lstm", [{"batch_first": True}, {"bidirectional": True}, {"num_layers": 2}])
def test_lstm_matches_eager(lstm):
    """``lstm`` (gates in MIL's ifoz order, PyTorch's are ifgo): one direction, both, stacked."""
    torch.manual_seed(0)
    model, x = Recurrent(**lstm).eval(), torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    # ct.convert takes no exported LSTM (aten.lstm.input): anefx's conversion writes the program
    fp32 = CoreMLOptions(compute_precision="float32")
    program = anefx.load(anefx.compile(model, (x,), target_options=fp32, artifact_check="off"))
    assert program.op_counts["main"].get("lstm") == lstm.get("num_layers", 1)
    (got,) = program({"x": x}).values()
    assert got.shape == tuple(want.shape)
    assert np.abs(got - want.numpy()).max() <= 5e-5 * float(want.abs().max())


def test_fp16_weights_are_stored_in_their_package_bytes(tmp_path, monkeypatch):
    """An fp16 program's weights are held as float16 (their exact values): the interpreter's
    constants take the weights' fp16 bytes, not twice them, and each op reads them as float32, so
    the outputs are bitwise those of weights held in float32."""
    import anefx.targets.mil.interpreter as interpreter

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ep = torch.export.export(model, (x,)).run_decompositions({})
    path = _save(ep, tmp_path / "mlp.mlpackage", precision="float16")

    def constant_bytes(program):
        held = {}
        for plan in program._plans.values():
            for v in plan.constants.values():
                if isinstance(v, torch.Tensor) and v.numel() >= 1024:
                    held[v.untyped_storage().data_ptr()] = (v.untyped_storage().nbytes(), v.dtype)
        return held

    program = MILProgram.open(path)
    held = constant_bytes(program)
    assert {d for _, d in held.values()} == {torch.float16}
    assert sum(b for b, _ in held.values()) == 2 * (64 * 96 + 96 * 32)  # the two weight matrices in fp16
    got = program.run_torch({"input": x})
    monkeypatch.setattr(interpreter, "STORED_FP16_MIN", 10**12)  # every weight held in float32
    wide = MILProgram.open(path)
    assert sum(b for b, _ in constant_bytes(wide).values()) == 4 * (64 * 96 + 96 * 32)
    want = wide.run_torch({"input": x})
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert float(next(iter(got.values())).float().abs().max()) > 0
