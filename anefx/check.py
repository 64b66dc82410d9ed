"""``anefx.check``: the ANE readiness report for a model or a :class:`CompiledModel` (public API layer)."""

from __future__ import annotations

from anefx.ane.report import ANEReport
from anefx.compile import CompiledModel
from anefx.compile import compile as anefx_compile


def check(model_or_compiled, example_inputs=(), example_kwargs=None, **compile_options) -> ANEReport:
    """ANE readiness report for a model (compiled with anefx's default pipeline, or ``compile_options``)
    or for a :class:`CompiledModel`, which is reused as it is (nothing is compiled again)."""
    if isinstance(model_or_compiled, CompiledModel):
        return model_or_compiled.ane_report
    return anefx_compile(model_or_compiled, example_inputs, example_kwargs, **compile_options).ane_report
