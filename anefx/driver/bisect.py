"""Find the pass that breaks a model, like LLVM's ``-opt-bisect-limit`` driven by a script.

Validation normally rolls a bad pass back, which hides it. Here validation is off: the pipeline runs
with ``bisect_limit = N`` (only the first N pass applications), the result is compared with the
model, and a binary search finds the smallest N whose graph is wrong. Pass N-1 is the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anefx.driver.debug import DebugOptions
from anefx.driver.pipeline import Pipeline
from anefx.driver.validate import ValidationOptions, Validator
from anefx.ir.capture import capture


@dataclass
class BisectResult:
    culprit_index: int | None  # None: the whole pipeline is fine
    culprit: str | None
    passes: list[str]
    checks: dict[int, str] = field(default_factory=dict)  # limit -> "ok" or the failure

    def __str__(self) -> str:
        lines = [f"  limit {n:>2}: {verdict}" for n, verdict in sorted(self.checks.items())]
        if self.culprit is None:
            head = f"all {len(self.passes)} pass applications keep the model correct"
        else:
            head = f"first bad pass application: ({self.culprit_index}) {self.culprit}"
        return "\n".join([head, *lines])


def bisect(model, example_inputs=(), example_kwargs=None, *, pipeline: Pipeline | None = None) -> BisectResult:
    pipeline = pipeline or Pipeline.default()
    cap = capture(model, example_inputs, example_kwargs)
    unchecked = pipeline.with_validation(mode="off")
    validator = Validator(cap.graph_module, cap.flat_inputs, ValidationOptions(), cap.reference_outputs)
    checks: dict[int, str] = {}

    def good(limit: int) -> bool:
        try:
            res = unchecked.run(cap.graph_module, cap.flat_inputs, debug=DebugOptions(bisect_limit=limit, quiet=True))
            verdict = validator.check(res.graph_module)
        except Exception as exc:  # a pass that raises is as bad as one that computes wrong values
            checks[limit] = f"raised {type(exc).__name__}: {exc}"
            return False
        checks[limit] = "ok" if verdict.ok else str(verdict.message)
        return verdict.ok

    n = len(pipeline.passes)
    if good(n):
        return BisectResult(None, None, pipeline.names, checks)
    lo, hi = 0, n  # good(lo) holds (no pass at all), good(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if good(mid):
            lo = mid
        else:
            hi = mid
    return BisectResult(hi - 1, pipeline.names[hi - 1], pipeline.names, checks)
