"""Validating the artifact: the converted program is executed (anefx's MIL interpreter) on the
validation's input sets and compared with PyTorch; a program that departs is located (MIL op,
torch node, source line) and an fp16 failure falls back to fp32 for the located region.

A planted converter bug (coremltools' ``gelu`` converter replaced by one that emits ``relu``) must
be caught and named, and must not be hidden by the fp16 fallback.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import anefx
from anefx.compat.coremltools import torch_node_inputs
from anefx.driver.validate import ValidationOptions, Validator
from anefx.targets.coreml import CoreMLOptions
from anefx.targets.localize import fx_name, locate
from anefx.targets.mil import MILProgram
from anefx.targets.verify import (
    FP16_FLOOR_CAP,
    ArtifactCheck,
    ArtifactCheckOptions,
    ArtifactError,
    InputSet,
    OutputError,
    check_and_fix,
    check_program,
    fp16_rounding_floor,
    input_sets_from_validator,
    judge_with_fp16_floor,
)
from examples import models

aten = torch.ops.aten


class GeluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.down(nn.functional.gelu(self.up(x))))  # the planted bug's line


@contextlib.contextmanager
def gelu_computed_as_relu():
    """coremltools' torch converter for ``gelu`` replaced by one that emits ``relu`` (restored after)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops, register_torch_op

    def gelu(context, node):
        x = torch_node_inputs(context, node, expected=[1, 2])[0]
        context.add(mb.relu(x=x, name=node.name))

    register_torch_op(gelu, override=True)
    try:
        yield
    finally:
        register_torch_op(ops.gelu, override=True)


def _input_sets(compiled, program) -> list[InputSet]:
    captured = compiled.captured
    validator = Validator(captured.graph_module, captured.flat_inputs, ValidationOptions())
    return input_sets_from_validator(validator, captured.input_names, captured.output_names, list(program.inputs()))


def _compile(model, args, kwargs=None, pipeline=None, fp32_nodes=()):
    """anefx.compile without its own artifact check (these tests run it by hand), optionally with
    the torch nodes ``fp32_nodes`` computed in fp32."""
    options = CoreMLOptions(fp32_nodes=frozenset(fp32_nodes))
    compiled = anefx.compile(model, args, kwargs or {}, pipeline=pipeline, target_options=options, artifact_check="off")
    return compiled, MILProgram.from_mlmodel(compiled.mlmodel)


def test_fx_name_reads_coremltools_names_back():
    names = {"x", "linear", "linear_1", "gelu", "layer_norm_2", "add"}
    assert fx_name("gelu_cast_fp16", names) == ("gelu", True)
    assert fx_name("linear_cast_fp16", names) == ("linear", True)
    assert fx_name("linear_1_cast_fp16", names) == ("linear_1", True)
    assert fx_name("x_to_fp16", names) == ("x", True)
    assert fx_name("linear_cast_fp16_to_fp32", names) == ("linear", True)
    assert fx_name("linear_0_cast_fp16", names) == (None, False)  # a counter's name, no node's (not a guess)
    assert fx_name("layer_norm_2_square", names) == ("layer_norm_2", False)  # a step of its conversion
    assert fx_name("linear_10_cast_fp16", names) == (None, False)  # not linear_1's
    assert fx_name("cast_3", names) == (None, False)


@pytest.fixture(scope="module")
def distilbert():
    """A small DistilBERT compiled with the artifact stage on (shared by the tests that read it)."""
    model, args, kwargs = models.distilbert_small(pad=4)
    return anefx.compile(model, args, kwargs)


def test_check_measures_every_output_on_every_input_set(distilbert):
    compiled = distilbert
    program = MILProgram.from_mlmodel(compiled.mlmodel)
    sets = _input_sets(compiled, program)
    assert [s.name for s in sets][-3:] == [
        "stress: masks with right padding",
        "stress: masks with left padding",
        "stress: masks with one kept",
    ]
    check = check_program(program, sets)
    assert check.ok, check.message()
    assert check.precision == "fp16" and check.input_sets == [s.name for s in sets]
    (out,) = check.outputs.values()
    assert 1e-5 < out.rel_error <= 1e-2 and out.nonfinite == 0  # fp16 ran in fp16, within tolerance
    assert check.summary()["outputs"]["last_hidden_state"]["rel_error"] == out.rel_error
    # the same program against references off by 5 % on one input set
    wrong = [InputSet(s.name, s.inputs, {k: v * 1.05 for k, v in s.expected.items()}, s.undefined) for s in sets]
    failed = check_program(program, sets[:1] + wrong[1:2])
    assert not failed.ok and failed.outputs["last_hidden_state"].input_set == sets[1].name
    assert "last_hidden_state" in failed.message() and "of its scale" in failed.message()
    assert check_program(program, sets, options=ArtifactCheckOptions(mode="example")).input_sets == ["example"]


class Squares(nn.Module):
    def forward(self, x):
        return (x * 400.0) * (x * 400.0)  # beyond 65,504 in fp16


def test_inf_in_the_program_is_a_failure():
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    compiled, program = _compile(Squares(), (x,), pipeline=anefx.Pipeline.empty())
    check = check_program(program, _input_sets(compiled, program))
    (out,) = check.outputs.values()
    assert not check.ok and out.nonfinite > 0 and math.isinf(out.rel_error)
    assert "inf or NaN" in check.message()


def test_a_planted_converter_bug_is_located_at_its_op_node_and_line():
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GeluBlock().eval()
    with gelu_computed_as_relu():
        compiled, program = _compile(model, (x,))
    assert program.op_counts["main"].get("relu") == 1 and "gelu" not in program.op_counts["main"]
    sets = _input_sets(compiled, program)
    assert not check_program(program, sets).ok
    found = locate(program, compiled.artifact.package.converter_input, sets[0].inputs)
    assert (found.op_type, found.node, found.local, found.overflow) == ("relu", "gelu", True, False)
    assert found.torch_op.startswith("%gelu (aten.gelu)")
    assert found.location == f"{__file__}:{GeluBlock.forward.__code__.co_firstlineno + 1}"
    # the fp16 fallback cannot hide it: fp32 for the region (grown upstream round by round: the
    # gelu, then the linear feeding it) changes nothing, the check still fails
    with gelu_computed_as_relu():
        _shipped, check = check_and_fix(
            program,
            sets,
            reference=compiled.artifact.package.converter_input,
            reconvert=lambda region: _compile(model, (x,), fp32_nodes=region)[1],
        )
    assert not check.ok and set(check.fallback["fp32_nodes"]) == {"gelu", "linear"}
    assert "relu 'gelu'" in check.message() and "aten.gelu" in check.message()


def test_an_fp16_overflow_falls_back_to_fp32_for_its_region_only():
    """RMSNorm spelled out (no rms_norm_bc1s, no fp16_norm_scale): its squares overflow in fp16; the
    located region (the square and the mean that reads it) computes in fp32, the rest in fp16."""
    model, args, kwargs = models.large_rms_norm(seq=16)
    pipeline = anefx.Pipeline.default().without("rms_norm_bc1s", "fp16_norm_scale")
    compiled, program = _compile(model, args, kwargs, pipeline)
    sets = _input_sets(compiled, program)
    assert not check_program(program, sets).ok
    shipped, check = check_and_fix(
        program,
        sets,
        reference=compiled.artifact.package.converter_input,
        reconvert=lambda region: _compile(model, args, kwargs, pipeline, fp32_nodes=region)[1],
    )
    assert check.ok, check.message()
    nodes = {n.name: n for n in compiled.artifact.package.converter_input.graph.nodes}
    region = check.fallback["fp32_nodes"]
    assert {nodes[n].target for n in region} == {aten.pow.Tensor_Scalar, aten.mean.dim}
    assert "overflows fp16" in check.fallback["first_divergence"]
    fp32_ops = {op.op_type for op in shipped.operations() if op.dtypes == ("fp32",)} - {"cast"}
    assert fp32_ops == {"pow", "reduce_mean"}


# ---------------------------------------------------------------------------------------------
# inside anefx.compile: the artifact stage
# ---------------------------------------------------------------------------------------------


def test_compile_reports_the_executed_artifact(distilbert):
    check = distilbert.report.artifact["main"]
    assert check["ok"] and check["runtime"] == "mil" and check["precision"] == "fp16" and check["input_sets"] == 5
    out = check["outputs"]["last_hidden_state"]
    assert 1e-5 < out["rel_error"] <= 1e-2 and out["nonfinite"] == 0
    assert "artifact main (mil, fp16, 5 input sets): ok" in str(distilbert.report)
    model, args, _ = models.mlp()
    off = anefx.compile(model, args, artifact_check="off")
    assert off.report.artifact == {"status": "not executed (off)"}


def test_compile_refuses_a_planted_converter_bug_and_names_it(tmp_path):
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with gelu_computed_as_relu(), pytest.raises(ArtifactError) as info:
        anefx.compile(GeluBlock().eval(), (x,))
    text = str(info.value)
    assert "MIL op #" in text and "(relu 'gelu')" in text and "%gelu (aten.gelu)" in text
    assert f"{__file__}:{GeluBlock.forward.__code__.co_firstlineno + 1}" in text  # the model's line
    assert "Nothing was written" in text and not list(tmp_path.iterdir())


class PeakyAttention(nn.Module):
    """Unscaled attention logits up to ~30 (T5's): fp16's rounding of a logit moves its probability."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return torch.softmax((x @ self.w) * 8.0, dim=-1), x * 2.0


def test_the_fp16_floor_is_the_graph_executed_with_every_value_rounded_to_fp16():
    model = PeakyAttention()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    floors = fp16_rounding_floor(gm, [x], list(reference), ["probs", None])
    assert list(floors) == ["probs"]  # an output named None is left out

    def r(t):
        return t.half().float()

    by_hand = torch.softmax(r(r(r(x) @ r(model.w)) * 8.0), dim=-1)
    rel = float((r(by_hand) - reference[0]).abs().max() / reference[0].abs().max())
    assert floors["probs"] == pytest.approx(rel, rel=1e-6)
    twice = fp16_rounding_floor(gm, [x], list(reference), [None, "twice"])["twice"]
    assert twice <= 2.0**-11 and floors["probs"] > 10 * twice  # the logits' scale amplifies the rounding


def test_an_fp16_output_is_judged_again_within_its_floor_up_to_the_cap():
    def check(*outputs):
        return ArtifactCheck("f", "mil", "fp16", 0.03, outputs={o.name: o for o in outputs})

    options = ArtifactCheckOptions(fp16_noise_margin=2.0)
    noisy = OutputError("noisy", 0.2, 6.5, 0.031, ok=False)
    beyond = OutputError("beyond", 0.5, 6.5, 0.08, ok=False)
    capped = OutputError("capped", 0.9, 6.5, 0.12, ok=False)
    inf = OutputError("inf", math.inf, 6.5, math.inf, nonfinite=3, ok=False)
    fine = OutputError("fine", 0.01, 6.5, 0.001)
    judged = check(noisy, beyond, capped, inf, fine)
    judge_with_fp16_floor(judged, {"noisy": 0.036, "beyond": 0.03, "capped": 0.5, "inf": 0.5, "fine": 0.5}, options)
    assert noisy.ok and noisy.tolerance == pytest.approx(0.072) and noisy.fp16_floor == 0.036
    assert not beyond.ok and beyond.tolerance == pytest.approx(0.06)  # more than twice what fp16 errs
    assert not capped.ok and capped.tolerance == FP16_FLOOR_CAP  # fp16 itself is unusable there
    assert not inf.ok and inf.tolerance is None and fine.tolerance is None  # inf stays a failure; passes untouched
    assert "the graph rounded to fp16 at every value: 0.03" in judged.message()
    assert judged.summary()["outputs"]["noisy"] == {
        "max_abs_error": 0.2,
        "rel_error": 0.031,
        "nonfinite": 0,
        "fp16_floor": 0.036,
        "tolerance": pytest.approx(0.072),
    }


def test_the_fp16_floor_does_not_excuse_a_converter_bug():
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with gelu_computed_as_relu(), pytest.raises(ArtifactError) as info:
        anefx.compile(GeluBlock().eval(), (x,), artifact_check=ArtifactCheckOptions(fp16_noise_margin=2.0))
    floor = float(str(info.value).split("the graph rounded to fp16 at every value: ")[1].split(")")[0])
    assert floor < 2e-3  # the graph's own fp16 error: far below the planted bug's


def test_compile_falls_back_to_fp32_for_an_overflowing_region():
    model, args, kwargs = models.large_rms_norm()
    pipeline = anefx.Pipeline.default().without("rms_norm_bc1s", "fp16_norm_scale")  # the squares overflow
    compiled = anefx.compile(model, args, kwargs, pipeline=pipeline)
    check = compiled.report.artifact["main"]
    assert (
        check["ok"] and check["fallback"]["rounds"] == 1 and "overflows fp16" in check["fallback"]["first_divergence"]
    )
    shipped = MILProgram.from_mlmodel(compiled.mlmodel)  # what save() writes: the region in fp32
    assert {op.op_type for op in shipped.operations() if op.dtypes == ("fp32",)} - {"cast"} == {"pow", "reduce_mean"}


class TimestepStack(nn.Module):
    """diffusers' sinusoidal timestep embedding (``sin``/``cos`` of the timestep times frequencies:
    fp16 rounds an argument near 999 by up to 0.25) added to the input of two layers."""

    def __init__(self, c=64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(c, c) for _ in range(2))
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(c // 2) / (c // 2)))

    def forward(self, x, t):
        arg = t[:, None].float() * self.freqs[None]
        h = x + torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)[:, None, :]
        for layer in self.layers:
            h = torch.relu(layer(h))
        return h


def test_each_chunk_of_a_chain_falls_back_on_its_own():
    """A chain of packages: the chunk holding the timestep embedding is converted again with its
    region in fp32 (found against that chunk's own graph); the other chunks ship as converted."""
    torch.manual_seed(0)
    model = TimestepStack().eval()
    layer_mb = sum(p.numel() for p in model.layers[0].parameters()) * 2 / 1e6
    args = (torch.randn(2, 8, 64), torch.tensor([999, 901]))
    compiled = anefx.compile(model, args, max_chunk_mb=1.5 * layer_mb)
    checks = compiled.report.artifact
    assert sorted(checks) == ["chunk0", "chunk1"] and all(c["ok"] for c in checks.values()), checks
    fell_back = {k: c["fallback"] for k, c in checks.items() if c.get("fallback")}
    (fallback,) = fell_back.values()
    # in one round: the sine, its argument (the timestep x frequencies, ~900: fp16 rounds it by up
    # to 0.25) and the cosine of the same argument; not the layers
    assert fallback["rounds"] == 1 and {"sin", "cos", "mul"} <= set(fallback["fp32_nodes"]), fallback
    assert not {"linear", "relu", "add"} & set(fallback["fp32_nodes"]), fallback
    t = torch.tensor([997, 3])
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    out = next(iter(anefx.load(compiled)({"x": x.numpy(), "t": t.numpy()}).values()))
    with torch.no_grad():
        ref = model(x, t)
    assert float((torch.as_tensor(out).double() - ref).abs().max() / ref.abs().max()) < 1e-2


class BeyondFp16(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.fc(x)) + 100000.0  # the output holds values beyond fp16's 65,504


def test_an_output_beyond_fp16_falls_back_to_an_fp32_output():
    """coremltools computes the add in fp32 (its constant does not fit fp16) and casts the output
    back to fp16: all inf. The cast (an op of coremltools' own) is located by the value it holds, and
    the fallback computes the region in fp32 up to an fp32 output."""
    torch.manual_seed(0)
    compiled = anefx.compile(BeyondFp16().eval(), (torch.randn(1, 8, 16),))
    check = compiled.report.artifact["main"]
    assert check["ok"] and check["fallback"]["rounds"] == 1, check
    first = check["fallback"]["first_divergence"]
    assert "(cast '" in first and "(aten.add)" in first and "overflows fp16" in first
    assert f"{__file__}:{BeyondFp16.forward.__code__.co_firstlineno + 1}" in first
    assert anefx.load(compiled).outputs()["output"].dtype == np.float32


def test_a_program_the_interpreter_cannot_run_is_said_not_refused(monkeypatch):
    """An op without a kernel is the interpreter's gap, not evidence against the program: the
    compile ships it (as the stock conversion would), and the report and a warning name the op."""
    from anefx.targets.mil import interpreter

    monkeypatch.setattr(interpreter, "SUPPORTED_OPS", interpreter.SUPPORTED_OPS - {"relu"})
    model, args, _ = models.mlp()
    with pytest.warns(UserWarning, match="not checked by executing it.*'relu'"):
        compiled = anefx.compile(model, args)
    (status,) = compiled.report.artifact.values()
    assert status.startswith("not executed (anefx's MIL interpreter has no kernel for 'relu'")
    assert compiled.mlmodel is not None


class NormResidual(nn.Module):
    """A ResNet step as diffusers' UNet spells it: GroupNorm (coremltools lowers it into ops it names
    ``reshape_0`` … ``add_0``, ``add_1``), a conv, a per-row time bias, a residual add."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv = nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.norm = nn.GroupNorm(8, 32)

    def forward(self, x, temb):
        h = self.conv_in(x)
        y = self.conv(nn.functional.silu(self.norm(h))) + temb[:, :, None, None]
        return (h + y) / 1.0


def test_coremltools_names_never_take_a_nodes_name(monkeypatch):
    """coremltools names the ops of a lowering from a process-wide counter per op type: in a fresh
    process aten.group_norm's bias add (fused into a ``batch_norm``) was named ``add_1``, the graph's
    own ``add_1`` was renamed ``add_1_1``, and the localisation compared the GroupNorm's output with
    the residual sum: a correct program "departed at batch_norm 'add_1', wrong by itself" (the
    SD-1.5 UNet's chunk 0), and the fp16 fallback put the wrong ops in fp32."""
    from coremltools.converters.mil.mil.builder import Builder

    monkeypatch.setattr(Builder, "name_count", __import__("collections").defaultdict(int))  # a fresh process's
    torch.manual_seed(0)
    model = NormResidual().eval()
    nn.init.normal_(model.norm.weight), nn.init.normal_(model.norm.bias)  # an affine coremltools keeps
    args = (torch.randn(2, 4, 8, 8), torch.randn(2, 32))  # batch 2, a time bias per row
    compiled, program = _compile(model, args, pipeline=anefx.Pipeline.default().without("group_norm_4d"))
    reference = compiled.artifact.package.converter_input
    nodes = {n.name for n in reference.graph.nodes}
    ops = {op.name: op for op in program.operations()}
    assert "add_1" in nodes and "group_norm" in nodes
    (norm_affine,) = [op for op in ops.values() if op.op_type == "batch_norm"]
    assert fx_name(norm_affine.name, nodes)[0] is None  # not a node's name
    assert ops["add_1_cast_fp16"].op_type == "add" and not any(n.startswith("add_1_1") for n in ops)
    sets = _input_sets(compiled, program)
    assert check_program(program, sets).ok
    assert locate(program, reference, sets[1].inputs, input_set=sets[1].name) is None


@contextlib.contextmanager
def linear_without_bias():
    """coremltools' torch converter for ``linear`` replaced by one that drops the bias (restored
    after); like coremltools' own, its op has a made-up name and only its value is named after the
    node."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops, register_torch_op

    def linear(context, node):
        x, weight = torch_node_inputs(context, node, expected=[2, 3])[:2]
        res = mb.linear(x=x, weight=weight)
        res.name = node.name
        context.add(res, torch_name=node.name)

    register_torch_op(linear, override=True)
    try:
        yield
    finally:
        register_torch_op(ops.linear, override=True)


def test_ops_are_named_after_their_nodes_wherever_the_counters_stand(monkeypatch):
    """coremltools names a ``linear`` op ``linear_<n>`` from a counter per op type that is reset only
    after a conversion completes (one that raised, or MIL built outside a conversion, moves it);
    reading ``linear_0`` as the node ``linear`` was a guess that the counter stood at 0. With the
    counter at 57, a converter bug in the first linear must still be located at that linear (main:
    its ops ``linear_57``/``linear_58`` were no node's, and the walk blamed the correct gelu after it,
    "wrong by itself", against the graph's value of its input)."""
    from collections import defaultdict

    from coremltools.converters.mil.mil.builder import Builder

    monkeypatch.setattr(Builder, "name_count", defaultdict(int, linear=57))
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GeluBlock().eval()
    with linear_without_bias():
        compiled, program = _compile(model, (x,))
    reference = compiled.artifact.package.converter_input
    linears = [op.name for op in program.operations() if op.op_type == "linear"]
    assert linears == ["linear_cast_fp16", "linear_1_cast_fp16"]
    sets = _input_sets(compiled, program)
    assert not check_program(program, sets).ok
    found = locate(program, reference, sets[0].inputs)
    assert (found.op_type, found.node, found.local, found.overflow) == ("linear", "linear", True, False)
    assert found.location == f"{__file__}:{GeluBlock.forward.__code__.co_firstlineno + 1}"


class LiveStorages(TorchDispatchMode):
    """The peak bytes of tensor storages of at least ``min_bytes`` alive together, looked at after
    every torch op while the mode is on (storages by weak reference: a storage counts from the op
    that made it until nothing holds it, whoever holds it)."""

    def __init__(self, min_bytes: int):
        super().__init__()
        self.min_bytes, self.peak = min_bytes, 0
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.min_bytes:
                storage = t.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if known is None or known[0].expired():  # a view of a live storage counts once
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for ref, n in self.storages.values() if not ref.expired()))
        return out


class TanhChain(nn.Module):
    """``layers`` steps of 1 MiB values, one after the other, then a gelu."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        h = x
        for i in range(self.layers):
            h = torch.tanh(h * (1.0 + 0.01 * i)) + 0.01
        return nn.functional.gelu(h) * 0.5


def test_locate_holds_the_live_values_not_the_programs_every_value():
    """locate compares each op as it runs and holds a value only while an op still to come reads it
    (both runs', and its own): the bytes alive at once do not grow with the program's length (14 MiB
    at 6 layers and at 24). It kept every value of both runs: 43 MiB alive at 6 layers, 124 MiB at
    24, and the check of an SD-1.5 UNet's chunk at latent 64 was killed at 17 GiB."""
    x = torch.randn(1, 64, 64, 64, generator=torch.Generator().manual_seed(0))  # 1 MiB in fp32
    peaks = []
    for layers in (6, 24):
        with gelu_computed_as_relu():
            compiled, program = _compile(TanhChain(layers).eval(), (x,))
        sets = _input_sets(compiled, program)
        probe = LiveStorages(x.numel() * 2)  # the fp16 values and every larger one
        with probe:
            found = locate(program, compiled.artifact.package.converter_input, sets[0].inputs)
        assert (found.op_type, found.node, found.local, found.overflow) == ("relu", "gelu", True, False)
        assert found.position == program.operations()[-2].position  # the last but one op (the gelu's)
        peaks.append(probe.peak)
    assert peaks[1] == peaks[0], [p / 2**20 for p in peaks]


class TwoChains(nn.Module):
    """Two chains of ``n`` 1 MiB values each, summed: the graph holds all of ``a``'s then ``b``'s."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, a, b):
        for _ in range(self.n):
            a = torch.tanh(a)
        for _ in range(self.n):
            b = torch.sigmoid(b)
        return a + b


def _interleaved_chains(n: int, shape) -> MILProgram:
    """``TwoChains(n)`` as a program that runs the two chains' ops in turns, named after the graph's nodes."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape), mb.TensorSpec(shape)], opset_version=ct.target.iOS17)
    def prog(a, b):
        for i in range(n):
            a = mb.tanh(x=a, name="tanh" + (f"_{i}" if i else ""))
            b = mb.sigmoid(x=b, name="sigmoid" + (f"_{i}" if i else ""))
        return mb.add(x=a, y=b, name="add")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32)
    return MILProgram.from_mlmodel(mlmodel)


def test_locate_runs_the_graph_in_the_programs_order():
    """The program runs the two chains in turns, the graph one after the other: asked for the first
    sigmoid, a walk in the graph's order would run (and hold, until their ops come) every tanh; in
    the program's order the bytes alive do not grow with the chains (16 MiB at 4 and at 16 steps;
    in the graph's order 18 and 30 MiB; keeping every value, 28 and 76 MiB)."""
    shape = (1, 64, 64, 64)
    g = torch.Generator().manual_seed(0)
    inputs = {"a": torch.randn(shape, generator=g), "b": torch.randn(shape, generator=g)}
    peaks = []
    for n in (4, 16):
        program = _interleaved_chains(n, shape)
        assert [op.name for op in program.operations()][:3] == ["tanh", "sigmoid", "tanh_1"]
        probe = LiveStorages(2**20)
        with probe:
            assert locate(program, torch.fx.symbolic_trace(TwoChains(n)), inputs) is None
        peaks.append(probe.peak)
    assert peaks[1] == peaks[0], [p / 2**20 for p in peaks]


def test_the_fp16_floors_are_named_as_the_check_names_the_program_outputs():
    """A program whose outputs ``ct.convert`` named after MIL values (``var_7``) is compared with the
    graph's outputs by position (:func:`match_outputs`): its floors must be found under the same
    names, or the floor never applies."""
    from anefx.core.artifact_check import _fp16_floors
    from anefx.targets.artifact import Program
    from anefx.targets.handoff import HandOff

    model = PeakyAttention()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    validator = Validator(gm, [x], ValidationOptions())
    program = Program({"main": HandOff(gm, (x,), {}, ["x"], ["probs", "twice"], validator)})
    by_graph = fp16_rounding_floor(gm, [x], validator.references[0], ["probs", "twice"])
    floors = _fp16_floors(program, "main", ["example"], ["var_7", "var_9"])
    assert floors == {"var_7": by_graph["probs"], "var_9": by_graph["twice"]}
    assert _fp16_floors(program, "main", ["example"], ["twice", "probs"]) == by_graph  # by name where they agree
