"""Validate the artifact: run the program that ships and compare it with the PyTorch model.

Validation of the passes stops at the graph anefx hands to the converter. What ships is the
program the converter wrote: coremltools' frontend, its MIL passes, the cast to fp16, states,
compressed weights. :func:`check_program` runs that program (any :class:`LoadedProgram`: the MIL
interpreter, Core AI's runtime, Core ML on macOS) on input sets whose expected outputs come from
PyTorch, and measures each output:

* ``max_abs_error`` and ``scale`` (the largest finite magnitude of the expected output), and their
  ratio ``rel_error``: the error relative to that output's scale;
* ``nonfinite``: elements that are inf or NaN where the reference is finite. Any is a failure.

Tolerance (``rel_error``, per output, on every input set), :class:`ArtifactCheckOptions`:

* fp16 programs: ``1e-2`` of the output's scale. fp16 holds 11 significant bits (a relative
  rounding of ~5e-4 per stored value); a transformer stores a few hundred values on the path to
  each output, and the accumulated rounding of a well-conditioned model stays well inside 1e-2.
  An error above it means the program computes something else: a converter bug, a value that
  overflows or underflows fp16, a state written at the wrong place;
* fp32 programs: ``1e-4`` of the output's scale (the interpreter's accumulation order is not the
  device's; the graph's own validation holds fp32 to 2e-5);
* integer and boolean outputs (token ids of an ``argmax`` or ``top-k`` head) must agree on at least
  ``integer_agreement`` of their elements (default 90 %: fp16 may reorder a near-tie, a program
  that computes something else agrees on few).

fp16 programs of ill-conditioned models (``fp16_noise_margin``, set by ``compile_lm``): a model can
amplify fp16's rounding beyond ``fp16_tolerance`` by itself (T5's unscaled attention: a relative error
δ of a query or key moves a logit of magnitude 30 by 30δ). When an fp16 output fails, the graph the
program was converted from is run again on the same input set with every value rounded to fp16 (each
op computed in fp32 from fp16 values, its result rounded: an ideal fp16 execution,
:func:`fp16_rounding_floor`). Its error against the reference is the error fp16 itself makes on this
model; the program's, another draw of the same rounding (other accumulation order, casts, fused ops),
may reach ``fp16_noise_margin`` times it, never more than ``FP16_FLOOR_CAP`` of the scale. A converter
bug or an overflow errs by the output's whole scale, far above it.

Elements the reference leaves undefined (attention rows whose keys are all masked, see
:mod:`anefx.driver.validate`) are not compared, as in the graph's validation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from anefx.compat.torch import tree_leaves
from anefx.ir.errors import AnefxError
from anefx.targets.executor import LoadedProgram

FP16_TOLERANCE = 1e-2
FP32_TOLERANCE = 1e-4
#: the most an output's tolerance is raised to by the model's own fp16 rounding floor: an output that
#: an ideal fp16 execution computes to worse than 10 % of its scale is not one to ship in fp16
FP16_FLOOR_CAP = 0.1


class ArtifactError(AnefxError):
    """The program that would ship computes something else than the model."""


@dataclass(frozen=True)
class ArtifactCheckOptions:
    """How the converted program is checked by executing it.

    ``mode``: ``"all"`` runs every input set of the graph's validation (the example, the random
    sets and the stress masks); ``"example"`` the example only (for large models); ``"off"`` does
    not execute the program (the report says so)."""

    mode: Literal["off", "example", "all"] = "all"
    fp16_tolerance: float = FP16_TOLERANCE  #: max abs error / output scale, fp16 programs
    fp32_tolerance: float = FP32_TOLERANCE  #: max abs error / output scale, fp32 programs
    #: fraction of equal elements required of integer outputs (token ids of an argmax / top-k head:
    #: fp16 may reorder a near-tie)
    integer_agreement: float = 0.9
    #: on failure, find the MIL op where the program departs from the graph (MIL interpreter only)
    localize: bool = True
    #: on an fp16 failure, convert again with the located region in fp32 (rounds at most)
    fp16_fallback_rounds: int = 4
    #: fp16 programs: an output that fails ``fp16_tolerance`` passes within this many times the
    #: error of its graph executed with every value rounded to fp16 on the same input set (the
    #: model's own fp16 floor, :func:`fp16_rounding_floor`), at most ``FP16_FLOOR_CAP``; 0: not measured
    fp16_noise_margin: float = 0.0

    def __post_init__(self):
        if self.mode not in ("off", "example", "all"):
            raise AnefxError(f"ArtifactCheckOptions.mode must be 'off', 'example' or 'all', got {self.mode!r}")

    def tolerance(self, precision: str) -> float:
        return self.fp16_tolerance if precision == "fp16" else self.fp32_tolerance


@dataclass
class InputSet:
    """One run of a program: its inputs by name and the outputs PyTorch gives for them."""

    name: str  #: "example", "random", "stress: masks with left padding" …
    inputs: dict[str, Any]
    expected: dict[str, torch.Tensor]
    #: per output, elements not compared (True where the reference is undefined); None: all compared
    undefined: dict[str, torch.Tensor | None] | None = None
    #: initial values of the function's states (None: zeros)
    states: dict[str, Any] | None = None
    #: the states' values PyTorch leaves after the call (compared as outputs named ``state:<name>``)
    expected_states: dict[str, torch.Tensor] | None = None


@dataclass
class OutputError:
    """How far one output of the program is from PyTorch's, at its worst input set."""

    name: str
    max_abs_error: float
    scale: float  #: largest finite |expected| (of the input set with the worst error)
    rel_error: float  #: max_abs_error / scale (inf when some element is inf or NaN)
    nonfinite: int = 0  #: inf / NaN elements where the reference is finite
    mismatches: int = 0  #: integer outputs: elements that differ
    elements: int = 0
    input_set: str = "example"
    ok: bool = True
    #: error of the graph executed with every value rounded to fp16 (None: not measured)
    fp16_floor: float | None = None
    #: the tolerance this output was held to, when the fp16 floor raised it above the check's
    tolerance: float | None = None

    def describe(self) -> str:
        if self.nonfinite:
            return f"{self.name}: {self.nonfinite} of {self.elements} elements inf or NaN [{self.input_set}]"
        if self.mismatches:
            return f"{self.name}: {self.mismatches} of {self.elements} elements differ [{self.input_set}]"
        text = (
            f"{self.name}: max abs error {self.max_abs_error:.3g}, {self.rel_error:.3g} of its scale "
            f"{self.scale:.3g} [{self.input_set}]"
        )
        if self.fp16_floor is not None:
            text += f" (the graph rounded to fp16 at every value: {self.fp16_floor:.3g})"
        return text


@dataclass
class ArtifactCheck:
    """The outcome of executing one function of a program on the input sets."""

    function: str
    runtime: str
    precision: str  #: "fp16" or "fp32"
    tolerance: float
    outputs: dict[str, OutputError] = field(default_factory=dict)
    input_sets: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: outputs of the program with no reference (not compared)
    not_compared: list[str] = field(default_factory=list)
    #: where the program departs from the graph (a :class:`~anefx.targets.localize.Divergence`)
    divergence: Any = None
    #: what anefx did about a failure: the fp16 fallback's region and its outcome
    fallback: dict[str, Any] | None = None
    #: a run that failed outright (the executor raised)
    error: str | None = None
    #: localisation was attempted (a failure of a MIL interpreter program with a reference graph)
    localized: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.ok for o in self.outputs.values())

    @property
    def max_rel_error(self) -> float:
        return max((o.rel_error for o in self.outputs.values()), default=0.0)

    def failures(self) -> list[OutputError]:
        return [o for o in self.outputs.values() if not o.ok]

    def message(self) -> str:
        """One paragraph: what failed and where."""
        if self.ok:
            return f"function {self.function!r}: every output within {self.tolerance:g} of its scale"
        if self.error:
            return f"function {self.function!r} failed to run ({self.runtime}): {self.error}"
        parts = "; ".join(o.describe() for o in self.failures())
        text = (
            f"the {self.precision} program ({self.runtime}), function {self.function!r}, differs from the model: "
            f"{parts} (tolerance {self.tolerance:g} of each output's scale, no inf or NaN)"
        )
        if self.divergence is not None:
            text += f". {self.divergence}"
        elif self.localized:
            text += (
                ". No op of the program could be located: none whose name maps to a node of the reference "
                "graph differs (a program converted from another graph than this one keeps other names)"
            )
        return text

    def summary(self) -> dict[str, Any]:
        """What the compile report shows: per output max abs error and error relative to its scale."""
        out: dict[str, Any] = {
            "runtime": self.runtime,
            "precision": self.precision,
            "ok": self.ok,
            "tolerance": self.tolerance,
            "input_sets": len(self.input_sets),
            "seconds": round(self.seconds, 3),
            "outputs": {
                o.name: {
                    "max_abs_error": o.max_abs_error,
                    "rel_error": o.rel_error,
                    "nonfinite": o.nonfinite,
                    **({"mismatches": o.mismatches} if o.mismatches else {}),
                    **({"fp16_floor": o.fp16_floor} if o.fp16_floor is not None else {}),
                    **({"tolerance": o.tolerance} if o.tolerance is not None else {}),
                }
                for o in self.outputs.values()
            },
        }
        if self.not_compared:
            out["not_compared"] = list(self.not_compared)
        if self.error:
            out["error"] = self.error
        if self.divergence is not None:
            out["divergence"] = str(self.divergence)
        if self.fallback:
            out["fallback"] = dict(self.fallback)
        return out


def program_precision(program: LoadedProgram) -> str:
    """``"fp16"`` if the program computes in fp16 (some stored value is fp16), else ``"fp32"``."""
    precision = getattr(program, "precision", None)
    if precision in ("fp16", "fp32"):
        return precision
    for function in program.functions:
        specs = [*program.outputs(function).values(), *program.inputs(function).values()]
        if any(s.dtype == np.float16 for s in specs):
            return "fp16"
    return "fp32"


def _measure(name: str, got, want: torch.Tensor, undefined: torch.Tensor | None, set_name: str) -> OutputError:
    got = np.asarray(got)
    want = want.detach()
    if got.size != want.numel():
        return OutputError(name, math.inf, 0.0, math.inf, input_set=set_name, ok=False, elements=want.numel())
    got_t = torch.from_numpy(np.ascontiguousarray(got)).reshape(want.shape)
    n = want.numel()
    if not (want.dtype.is_floating_point or want.dtype.is_complex):
        mismatches = int((got_t.to(torch.int64) != want.to(torch.int64)).sum()) if n else 0
        return OutputError(name, float(mismatches > 0), 1.0, float(mismatches > 0), 0, mismatches, n, set_name)
    e = want.double()
    a = got_t.double()
    defined = ~torch.isnan(e)
    if undefined is not None:
        defined &= ~undefined.reshape(e.shape)
    finite = torch.isfinite(e)
    # inf or NaN in the program where the reference is finite, or a reference infinity not matched
    bad = defined & ((finite & ~torch.isfinite(a)) | (~finite & (a != e)))
    nonfinite = int(bad.sum())
    compared = defined & finite & torch.isfinite(a)
    diff = (a - e).abs().masked_fill(~compared, 0.0)
    max_abs = float(diff.max()) if n else 0.0
    scale = float(e.abs().masked_fill(~(defined & finite), 0.0).max()) if n else 0.0
    rel = max_abs / scale if scale > 0 else (math.inf if max_abs > 0 else 0.0)
    if nonfinite:
        rel = math.inf
    return OutputError(name, max_abs, scale, rel, nonfinite, 0, n, set_name)


def _worse(a: OutputError | None, b: OutputError) -> OutputError:
    if a is None:
        return b
    key = lambda o: (o.nonfinite + o.mismatches > 0, o.rel_error)  # noqa: E731
    return b if key(b) > key(a) else a


def match_outputs(program_outputs: Sequence[str], expected: Sequence[str]) -> dict[str, str]:
    """Program output name → expected output name: by name where they agree; by position when none
    does and the counts are equal (a program ``ct.convert`` wrote names its outputs after MIL values)."""
    same = {n: n for n in program_outputs if n in expected}
    if same or len(program_outputs) != len(expected):
        return same
    return dict(zip(program_outputs, expected))


def check_program(
    program: LoadedProgram,
    input_sets: Sequence[InputSet],
    *,
    function: str | None = None,
    options: ArtifactCheckOptions | None = None,
    precision: str | None = None,
) -> ArtifactCheck:
    """Run ``function`` of ``program`` on each input set (a fresh state per set when the function
    has states) and compare its outputs with the sets' expected outputs.

    Never raises for a wrong program: the returned :class:`ArtifactCheck` says what failed; an
    executor that fails on an input set is recorded in ``error``."""
    options = options or ArtifactCheckOptions()
    name = program.function_name(function)
    precision = precision or program_precision(program)
    check = ArtifactCheck(name, program.runtime, precision, options.tolerance(precision))
    if options.mode == "off" or not input_sets:
        return check
    sets = list(input_sets) if options.mode == "all" else list(input_sets[:1])
    start = time.perf_counter()
    worst: dict[str, OutputError] = {}
    outputs = list(program.outputs(name))
    for one in sets:
        mapping = match_outputs(outputs, list(one.expected))
        check.not_compared = [n for n in outputs if n not in mapping]
        state = None
        if program.states(name):
            state = program.make_state(name)
            for k, v in (one.states or {}).items():
                state[k] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        try:
            got = program(one.inputs, function=name, state=state)
        except Exception as exc:
            check.error = f"{type(exc).__name__}: {exc} [inputs: {one.name}]"
            break
        check.input_sets.append(one.name)
        for out_name, ref_name in mapping.items():
            undefined = (one.undefined or {}).get(ref_name)
            measured = _measure(out_name, got[out_name], one.expected[ref_name], undefined, one.name)
            worst[out_name] = _worse(worst.get(out_name), measured)
        for state_name, want in (one.expected_states or {}).items():
            key = f"state:{state_name}"
            measured = _measure(key, state[state_name], want, None, one.name)
            worst[key] = _worse(worst.get(key), measured)
    for o in worst.values():
        if o.mismatches:
            o.ok = 1.0 - o.mismatches / max(o.elements, 1) >= options.integer_agreement
        else:
            o.ok = o.ok and o.nonfinite == 0 and o.rel_error <= check.tolerance
    check.outputs = {n: worst[n] for n in [*outputs, *sorted(k for k in worst if k.startswith("state:"))] if n in worst}
    check.seconds = time.perf_counter() - start
    return check


class _RoundedToFP16(torch.fx.Interpreter):
    """Runs a graph with every floating value (inputs, weights, each op's result) rounded to fp16."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.to(torch.float16).to(out.dtype)
        return out


def fp16_rounding_floor(
    graph: torch.fx.GraphModule,
    flat_inputs: Sequence,
    reference_outputs: Sequence,
    keys: Sequence[str | None],
    undefined: Sequence | None = None,
) -> dict[str, float]:
    """The error (of its scale) of each output of ``graph`` executed with every value rounded to fp16
    (each op computed in fp32 from fp16 values: an ideal fp16 execution of the graph) against
    ``reference_outputs``, on ``flat_inputs``; flat output ``i`` is named ``keys[i]`` (None: left
    out). An output whose rounded execution is inf or NaN is left out (an overflow is no floor)."""
    with torch.no_grad():
        rounded = _RoundedToFP16(graph).run(*flat_inputs, enable_io_processing=False)
    floors = {}
    for i, (key, got, want) in enumerate(zip(keys, tree_leaves(rounded), reference_outputs)):
        if key is None or not isinstance(want, torch.Tensor) or not want.is_floating_point():
            continue
        mask = undefined[i] if undefined is not None and i < len(undefined) else None
        measured = _measure(key, got.detach(), want, mask, "")
        if not measured.nonfinite and math.isfinite(measured.rel_error):
            floors[key] = measured.rel_error
    return floors


def judge_with_fp16_floor(check: ArtifactCheck, floors: Mapping[str, float], options: ArtifactCheckOptions) -> None:
    """Judge the failing outputs of an fp16 ``check`` again, each within ``fp16_noise_margin`` times
    its fp16 floor (``floors``: the worst over the input sets, :func:`fp16_rounding_floor`), at most
    ``FP16_FLOOR_CAP``; inf / NaN and integer mismatches still fail."""
    for o in check.outputs.values():
        floor = floors.get(o.name)
        if o.ok or floor is None or o.nonfinite or o.mismatches:
            continue
        o.fp16_floor = floor
        o.tolerance = max(check.tolerance, min(FP16_FLOOR_CAP, options.fp16_noise_margin * floor))
        o.ok = o.rel_error <= o.tolerance


def input_sets_from_validator(
    validator,
    input_names: Sequence[str],
    output_names: Sequence[str],
    program_inputs: Sequence[str],
    states_in: Mapping[str, str] | None = None,
    states_out: Mapping[str, str] | None = None,
) -> list[InputSet]:
    """The graph validation's input sets (example, random, stress masks) and reference outputs as
    named :class:`InputSet` s for a program whose inputs are ``program_inputs``: flat input ``i``
    is the program input ``input_names[i]`` (inputs the program does not take, such as constants
    folded into it, are left out), or the initial value of the state ``states_in[name]``; flat output
    ``j`` is ``output_names[j]``, or the new value of the state ``states_out[name]``."""
    states_in, states_out = dict(states_in or {}), dict(states_out or {})
    wanted = set(program_inputs)
    sets = []
    for k, (set_name, flat, expected) in enumerate(
        zip(validator.set_names, validator.input_sets, validator.references, strict=False)
    ):
        undefined = validator.undefined[k] if k < len(validator.undefined) else None
        values = dict(zip(output_names, expected))
        masks = dict(zip(output_names, undefined)) if undefined is not None else None
        sets.append(
            InputSet(
                set_name,
                {n: v for n, v in zip(input_names, flat) if n in wanted and n not in states_in},
                {n: v for n, v in values.items() if isinstance(v, torch.Tensor) and n not in states_out},
                None if masks is None else {n: m for n, m in masks.items() if n not in states_out},
                {states_in[n]: v for n, v in zip(input_names, flat) if n in states_in} or None,
                {states_out[n]: v for n, v in values.items() if n in states_out} or None,
            )
        )
    return sets


def reference_input_sets(
    reference: torch.nn.Module | Any,
    flat_inputs: Sequence,
    input_names: Sequence[str],
    output_names: Sequence[str],
    program_inputs: Sequence[str],
    options=None,
) -> list[InputSet]:
    """Input sets for a program checked against a PyTorch graph (a captured ``GraphModule``): the
    example, seeded random sets and, when an input is mask-like, the stress masks of the graph's
    validation (:class:`anefx.driver.validate.Validator`), with the graph's outputs as reference."""
    from anefx.driver.validate import ValidationOptions, Validator

    validator = Validator(reference, list(flat_inputs), options or ValidationOptions())
    return input_sets_from_validator(validator, input_names, output_names, program_inputs)


def require_ok(check: ArtifactCheck) -> ArtifactCheck:
    """``check`` if it passed; else :class:`ArtifactError` with its message."""
    if not check.ok:
        raise ArtifactError(check.message() + ". Nothing was written.")
    return check


def _worst_set(check: ArtifactCheck, input_sets: Sequence[InputSet]) -> InputSet:
    failing = check.failures()
    wanted = failing[0].input_set if failing else input_sets[0].name
    return next((s for s in input_sets if s.name == wanted), input_sets[0])


def _upstream(reference: torch.fx.GraphModule, region: set[str]) -> set[str]:
    """``region`` with the ops whose outputs its nodes read, and those ops' other readers."""
    nodes = {n.name: n for n in reference.graph.nodes}
    producers = {i for name in region for i in nodes[name].all_input_nodes if i.op == "call_function"}
    readers = {u.name for p in producers for u in p.users if u.op == "call_function"}
    return region | {p.name for p in producers} | readers


def check_and_fix(
    program: LoadedProgram,
    input_sets: Sequence[InputSet],
    *,
    reference: torch.fx.GraphModule | None = None,
    reconvert: Callable[[set[str]], LoadedProgram] | None = None,
    function: str | None = None,
    options: ArtifactCheckOptions | None = None,
) -> tuple[LoadedProgram, ArtifactCheck]:
    """:func:`check_program`, and on failure: locate the op where the program departs from
    ``reference`` (the converter's input graph; MIL interpreter programs without states), then,
    for an fp16 program, convert again with that op's region in fp32 (``reconvert(torch node
    names)`` returns the new program) and check again, at most ``fp16_fallback_rounds`` times.
    A round whose divergence falls in the region already in fp32 grows the region upstream (the
    ops making its inputs, and their other readers); when nothing is left to grow, the rounds stop
    (fp32 does not fix it: not an fp16 problem). Returns the program to ship and its check, which may still fail
    (the caller raises: see :func:`require_ok`)."""
    from anefx.analysis.ranges import value_ranges
    from anefx.targets.localize import fp16_region, graph_inputs, locate

    options = options or ArtifactCheckOptions()
    check = check_program(program, input_sets, function=function, options=options)
    if check.ok or check.error or not options.localize or reference is None or not hasattr(program, "run_steps"):
        return program, check
    name = program.function_name(function)
    if program.states(name):
        return program, check

    def located(prog, chk):
        one = _worst_set(chk, input_sets)
        return one, locate(prog, reference, one.inputs, function=name, tolerance=chk.tolerance, input_set=one.name)

    one, check.divergence = located(program, check)
    check.localized = True
    region: set[str] = set()
    rounds = 0
    while reconvert is not None and check.precision == "fp16" and rounds < options.fp16_fallback_rounds:
        divergence = check.divergence
        if divergence is None:
            break
        if divergence.node in region:
            # fp32 there did not fix it: the op was handed inputs rounded to fp16 (a sine of a large
            # fp16 argument: a diffusion timestep times its frequencies). The ops that make them go to
            # fp32 too, with their other readers (the cosine of the same argument), one step a round
            grown = _upstream(reference, region)
            if grown == region:
                break
            region = grown
        else:
            absmax = value_ranges(reference, [graph_inputs(reference, one.inputs)])
            region |= fp16_region(divergence, reference, absmax, check.tolerance)
        rounds += 1
        candidate = reconvert(set(region))
        again = check_program(candidate, input_sets, function=function, options=options)
        again.fallback = {"fp32_nodes": sorted(region), "rounds": rounds, "first_divergence": str(divergence)}
        if again.ok:
            return candidate, again
        program, check = candidate, again
        if not check.error:
            one, check.divergence = located(program, check)
            check.localized = True
    return program, check
