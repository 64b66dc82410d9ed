"""The artifact stage: every converted package executed and compared with the model before it ships.

After conversion, each package of the artifact (one, or each chunk of a chain) runs with its
target's executor (Core ML: anefx's MIL interpreter; Core AI: coreai-core's runtime), function by
function, on the input sets its validation used (the example, random and stress sets; a function
with states starts from the set's states and its new states are compared too). The reference is
the one the graphs were validated against: the model's outputs for a whole program, each chunk's
own graph for a chunk. :func:`~anefx.targets.verify.check_and_fix` measures each output, and on a
failure locates the first MIL op that departs from the graph handed to the converter and, for an
fp16 program whose target can compute single ops in fp32, converts again with that region in fp32
(a package of one function: the whole program, or one chunk of a chain).
With ``fp16_noise_margin`` (``compile_lm`` sets it), an fp16 output that still fails is judged
against the model's own fp16 floor: its validated graph executed with every value rounded to fp16.
A package that still fails raises :class:`~anefx.targets.verify.ArtifactError` naming the output,
the MIL op, its torch node and its source line: nothing wrong ships.

A compressed package is then executed too, on its example inputs, against its converted graph run
in PyTorch with the weights the package ships (``variant="compressed"``): the check of the
``constexpr`` ops and of the package, not of the compression's error (that is the compression's
quality; ``compile_lm`` measures it by executing the fp16 and the compressed packages).

Each result goes to the function's report (``report.artifact``). A program holding an op the MIL
interpreter has no kernel for is not executed: the report and a warning say so, naming the op (the
interpreter's gap is not evidence against the program; the stock conversion ships it too).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from anefx.driver.events import Events
from anefx.targets.artifact import Artifact, Program
from anefx.targets.mil import UnsupportedOpError
from anefx.targets.verify import (
    ArtifactCheckOptions,
    ArtifactError,
    InputSet,
    check_and_fix,
    fp16_rounding_floor,
    input_sets_from_validator,
    judge_with_fp16_floor,
    match_outputs,
)


def _where(artifact: Artifact, program: Program, function: str) -> str:
    return f"chunk{program.index}" if artifact.chunked else function


def _sets(program: Program, function: str, executor) -> list[InputSet]:
    h = program.functions[function]
    if h.validator is None or not h.validator.references:
        return []
    return input_sets_from_validator(
        h.validator, h.input_names, h.output_names, list(executor.inputs(function)), h.states_in, h.states_out
    )


def check_converted(artifact: Artifact, reports: dict, options: ArtifactCheckOptions, events: Events) -> Artifact:
    """Execute every function of every package; ``reports``: function name → its ``Report``. Returns
    the artifact to ship (a package converted again with an fp32 region when the fallback fixed it)."""
    target = artifact.target
    if options.mode == "off" or target.capabilities.executor is None:
        why = "off" if options.mode == "off" else f"the {target.name} target has no executor"
        for report in reports.values():
            report.artifact["status"] = f"not executed ({why})"
        return artifact
    for program in artifact.programs:
        executor = shipped = None  # the previous chunk's program is released before this one loads
        try:
            executor = target.executor(program.package)
        except UnsupportedOpError as exc:  # the interpreter's gap, not the program's: said, not refused
            why = f"not executed ({exc})"
            warnings.warn(f"the converted program was not checked by executing it: {why}", stacklevel=2)
            for fn in program.functions:
                reports[fn].artifact[_where(artifact, program, fn)] = why
            continue
        for fn in program.functions:
            events.step(_where(artifact, program, fn))
            sets = _sets(program, fn, executor)
            if not sets:
                reports[fn].artifact[_where(artifact, program, fn)] = "not executed (validation is off)"
                continue
            made: dict = {}
            can_fall_back = target.precision == "float16" and target.with_fp32_nodes(()) is not None
            # a package of one function, alone or a chunk of a chain (each chunk is checked against
            # its own graph on its validated inputs, so its region is found and converted on its
            # own); the functions of a multifunction package share one conversion
            single = len(program.functions) == 1 and can_fall_back

            def reconvert(region, program=program, made=made):
                package = target.with_fp32_nodes(region).convert(program, events)
                made["package"] = package
                return target.executor(package)

            shipped, result = check_and_fix(
                executor,
                sets,
                reference=program.package.functions[fn].converter_input,
                reconvert=reconvert if single else None,
                function=fn,
                options=options,
            )
            if not result.ok and not result.error and result.precision == "fp16" and options.fp16_noise_margin > 0:
                floors = _fp16_floors(program, fn, result.input_sets, list(shipped.outputs(fn)))
                judge_with_fp16_floor(result, floors, options)
            reports[fn].artifact[_where(artifact, program, fn)] = result.summary()
            if not result.ok:
                raise ArtifactError(f"{result.message()}. Nothing was written")
            if shipped is not executor:
                program.package = made["package"]
                executor = shipped
    return artifact


def _fp16_floors(
    program: Program, function: str, input_sets: list[str], program_outputs: list[str]
) -> dict[str, float]:
    """Per output, named as the check names it (the program's output name, matched to the graph's
    output as the check matches them: :func:`~anefx.targets.verify.match_outputs`; a state
    ``state:<state>``), the worst error over the input sets ``input_sets`` of the function's
    validated graph executed with every value rounded to fp16
    (:func:`~anefx.targets.verify.fp16_rounding_floor`)."""
    h = program.functions[function]
    validator = h.validator
    keys = [f"state:{h.states_out[n]}" if n in h.states_out else n for n in h.output_names]
    floors: dict[str, float] = {}
    for k, name in enumerate(validator.set_names):
        if name not in input_sets or k >= len(validator.references):
            continue
        undefined = validator.undefined[k] if k < len(validator.undefined) else None
        flat, reference = validator.input_sets[k], validator.references[k]
        for key, floor in fp16_rounding_floor(h.graph_module, flat, reference, keys, undefined).items():
            floors[key] = max(floors.get(key, 0.0), floor)
    matched = match_outputs(program_outputs, h.value_outputs)
    by_program = {name: floors[graph] for name, graph in matched.items() if graph in floors}
    return by_program | {k: v for k, v in floors.items() if k.startswith("state:")}


def check_compressed(artifact: Artifact, reports: dict, options: ArtifactCheckOptions, events: Events) -> None:
    """Execute every compressed package on its example inputs against its converted graph run with
    the shipped weights. Functions with states are left to the front end's quality measurement,
    which executes the compressed package itself (``compile_lm``: the fp16 and the compressed
    packages generate and score the same sequences)."""
    if options.mode == "off" or artifact.target.capabilities.executor is None or artifact.compression is None:
        return
    for i, program in enumerate(artifact.programs):
        executor = None
        for fn, h in program.functions.items():
            if h.stateful:
                continue
            try:
                executor = executor or artifact.target.executor(program.package)
            except UnsupportedOpError:  # the converted package's check said so
                break
            events.step(f"{_where(artifact, program, fn)} compressed")
            sets = _sets(program, fn, executor)[:1]
            if not sets:
                continue
            compressed = artifact.compression.packages[i][fn]
            expected_sets = [_with_shipped_weights(program, fn, one, compressed) for one in sets]
            _, result = check_and_fix(executor, expected_sets, function=fn, options=options)
            reports[fn].artifact[f"{_where(artifact, program, fn)} compressed"] = result.summary()
            if not result.ok:
                raise ArtifactError(f"the compressed package: {result.message()}. Nothing was written")


def _with_shipped_weights(program: Program, function: str, one: InputSet, compressed) -> InputSet:
    """``one`` with its expected outputs (and states) from the converted graph run with the
    compressed package's weights."""
    h = program.functions[function]
    states = {name: spec.zeros() for name, spec in program.states.items()}
    for name, value in (one.states or {}).items():
        states[name] = value.clone()
    with torch.no_grad():
        outs = program.call(function, dict(one.inputs), states, compressed, "compressed")
    expected_states = {s: states[s] for s in h.states_out.values()} or None
    return dataclasses.replace(one, expected=outs, expected_states=expected_states)
