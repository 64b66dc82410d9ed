"""The MIL pass pipeline anefx hands to ``ct.convert``: coremltools' default, made cheaper, same result.

Profiling ``ct.convert`` on anefx's full-size DistilBERT shows one pass taking more than half of the
MIL pipeline: ``common::add_fp16_cast``, whose overflow check copies every fp32 weight twice (``abs``,
then a fancy index of the entries below 1e38) to find the largest magnitude. ``anefx::add_fp16_cast``
is that pass with the check answered by two reductions (``min``/``max``) when they settle it — every
weight whose magnitude stays within fp16's range, i.e. almost all — and by coremltools' own check
otherwise (infinities, NaNs, large values). Same casts, same program, a fraction of the time.

The pass is registered in coremltools' pass registry at conversion time (never on import), under the
``anefx`` namespace; coremltools' own passes are untouched. ``tests/test_coreml_target.py`` checks that
the converted program is op for op the same with coremltools' pipeline and with this one.
"""

from __future__ import annotations

import numpy as np

from anefx.compat.coremltools import fp16_cast_pass, pass_options

FP16_MAX = 65504.0
_REPLACEMENTS = {"common::add_fp16_cast": "anefx::add_fp16_cast"}


def _register() -> None:
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if "anefx::add_fp16_cast" in PASS_REGISTRY:
        return

    FP16ComputePrecision = fp16_cast_pass()

    @register_pass(namespace="anefx", name="add_fp16_cast")
    class FastFP16Cast(FP16ComputePrecision):
        """``common::add_fp16_cast`` with an overflow check that does not copy the weights."""

        @staticmethod
        def fp16_overflow(op) -> bool:
            for inputs in op.inputs.values():
                for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                    if var.op is None or var.op.op_type != "const" or not var.is_tensor_or_scalar_of(dtype="fp32"):
                        continue
                    value = np.asarray(var.op.val.val)
                    if value.size == 0:
                        continue
                    lo, hi = float(value.min()), float(value.max())
                    if max(hi, -lo) <= FP16_MAX:  # NaN compares False: falls through to the exact check
                        continue
                    return FP16ComputePrecision.fp16_overflow(op)
            return False


def pass_pipeline(ct, fp16: bool):
    """coremltools' default pipeline with the faster, equivalent passes swapped in (same order, options).

    Without fp16 compute precision coremltools drops ``add_fp16_cast`` itself: the default is returned."""
    pipeline = ct.PassPipeline.DEFAULT
    if not fp16:
        return pipeline
    _register()
    names = [_REPLACEMENTS.get(n, n) for n in pipeline.passes]
    options = {_REPLACEMENTS.get(n, n): opts for n, opts in pass_options(pipeline).items()}
    fast = ct.PassPipeline(pass_names=names, pipeline_name="anefx")
    for name, opts in options.items():
        fast.set_options(name, opts)
    return fast
