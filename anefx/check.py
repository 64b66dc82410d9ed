"""``anefx.check``: the ANE readiness report for a model or a :class:`CompiledModel`; and
``anefx.check_artifact``: a saved program executed and compared with the PyTorch model (public API layer)."""

from __future__ import annotations

from anefx.ane.report import ANEReport
from anefx.compile import CompiledModel
from anefx.compile import compile as anefx_compile
from anefx.driver.validate import ValidationOptions
from anefx.ir.capture import capture
from anefx.ir.errors import AnefxError
from anefx.targets.runtime import load
from anefx.targets.verify import ArtifactCheck, ArtifactCheckOptions, check_and_fix, reference_input_sets


def check(model_or_compiled, example_inputs=(), example_kwargs=None, **compile_options) -> ANEReport:
    """ANE readiness report for a model (compiled with anefx's default pipeline, or ``compile_options``)
    or for a :class:`CompiledModel`, which is reused as it is (nothing is compiled again)."""
    if isinstance(model_or_compiled, CompiledModel):
        return model_or_compiled.ane_report
    return anefx_compile(model_or_compiled, example_inputs, example_kwargs, **compile_options).ane_report


def check_artifact(
    path,
    model,
    example_inputs=(),
    example_kwargs=None,
    *,
    function: str | None = None,
    runtime: str = "auto",
    options: ArtifactCheckOptions | None = None,
    validation: ValidationOptions | None = None,
) -> ArtifactCheck:
    """Run the program saved at ``path`` (a ``.mlpackage`` anefx or ``ct.convert`` wrote, a chunk
    folder, an ``.aimodel``) and compare it with ``model``: on the example inputs, seeded random
    inputs and, when an input is mask-like, the stress masks of anefx's validation
    (:mod:`anefx.driver.validate`). The program's inputs are the model's inputs by name (the
    placeholder names ``torch.export`` gives: ``forward``'s argument names); its outputs are matched
    by name, or by position when no name matches. A failing program run by the MIL interpreter is
    located: the first MIL op that departs from the model's graph (``ArtifactCheck.divergence``)."""
    program = load(path, runtime)
    captured = capture(model, example_inputs, example_kwargs)
    name = program.function_name(function)
    wanted = list(program.inputs(name))
    unknown = [n for n in wanted if n not in captured.input_names]
    if unknown:
        raise AnefxError(
            f"{path} takes inputs {unknown} that the model's inputs {captured.input_names} do not name; "
            "pass example inputs named as the program's"
        )
    sets = reference_input_sets(
        captured.graph_module,
        captured.flat_inputs,
        captured.input_names,
        captured.output_names,
        wanted,
        validation or ValidationOptions(),
    )
    _, result = check_and_fix(program, sets, reference=captured.graph_module, function=name, options=options)
    return result
