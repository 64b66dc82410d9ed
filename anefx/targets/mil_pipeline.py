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

A program with states gets one more pass, ``anefx::drop_identity_state_writes``: a function that reads
a state without writing it (an encoder-decoder's ``decode`` reading the cross-attention states) or
does not touch it is exported with an identity write (:mod:`anefx.targets.stateful`), since
coremltools makes only written buffers states; the pass removes each ``coreml_update_state(s,
read_state(s))`` (no other write to ``s`` in the block) of a state the function reads, so that
state is read and never copied. A state the function does not use at all keeps its identity write
(coremltools' backend refuses a state nothing uses): ``encode`` copies the self-attention caches
once per input. And ``common::canonicalize_inplace_pattern`` is replaced by a fixed subclass
(coremltools' fails when two state values are followed by their writes: ``encode``, whose every
output is a state).
"""

from __future__ import annotations

import numpy as np

from anefx.compat.coremltools import fp16_cast_pass, inplace_pattern_pass, pass_options

FP16_MAX = 65504.0
_REPLACEMENTS = {"common::add_fp16_cast": "anefx::add_fp16_cast"}
_STATE_REPLACEMENTS = {"common::canonicalize_inplace_pattern": "anefx::canonicalize_inplace_pattern"}


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


def _register_state_pass() -> None:
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if "anefx::drop_identity_state_writes" in PASS_REGISTRY:
        return

    @register_pass(namespace="anefx", name="canonicalize_inplace_pattern")
    class CanonicalizeInplacePattern(inplace_pattern_pass()):
        """``common::canonicalize_inplace_pattern`` placing each state write before the op that
        follows its value *now*: coremltools' takes that op from the list of ops it copied before
        moving any, which may be a write it already moved (a KeyError when two values are followed
        by their writes, as in a function whose every output is a state)."""

        def _try_match_and_transform_pattern(self, op, block, block_operation_list):
            if op.op_type in ("read_state", "coreml_update_state") or not self._try_find_child_coreml_update_state_ops(
                op
            ):
                return
            super()._try_match_and_transform_pattern(op, block, list(block.operations))

    @register_pass(namespace="anefx", name="drop_identity_state_writes")
    class DropIdentityStateWrites(AbstractGraphPass):
        """``coreml_update_state(state=s, value=read_state(s))`` with no other write to ``s`` in its
        block, where the value read has other uses: removed, its uses read the value read. (A state
        read for nothing else keeps its write: a state the function never uses must still be used,
        or coremltools' backend fails on it.)"""

        def apply(self, prog):
            for function in prog.functions.values():
                self._block(function)

        def _block(self, block):
            writes: dict[int, int] = {}
            for op in block.operations:
                for inner in op.blocks:
                    self._block(inner)
                if op.op_type == "coreml_update_state":
                    writes[id(op.state)] = writes.get(id(op.state), 0) + 1
            for op in list(block.operations):
                if op.op_type != "coreml_update_state" or writes[id(op.state)] != 1:
                    continue
                source = op.value.op
                if source is None or source.op_type != "read_state" or source.input is not op.state:
                    continue
                if len(op.value.child_ops) < 2:  # read for nothing else: the write is what declares it
                    continue
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=op.value)
                block.remove_ops([op])


def pass_pipeline(ct, fp16: bool, fast: bool = True, states: bool = False, op_selector=None):
    """coremltools' default pipeline with the faster, equivalent passes swapped in (same order,
    options) when ``fast``; with ``states``, the identity state writes dropped at the end (once the
    frontend's casts and copies between a read and its write are gone).

    Without fp16 compute precision coremltools drops ``add_fp16_cast`` itself: the default is kept.
    ``op_selector`` (``op -> bool``): the ops the fp16 cast pass casts (the others stay fp32), as
    ``ct.transform.FP16ComputePrecision(op_selector=…)`` takes it."""
    pipeline = ct.PassPipeline.DEFAULT
    if not states and not (fast and fp16):
        return pipeline
    names = list(pipeline.passes)
    options = dict(pass_options(pipeline))
    if fast and fp16:
        _register()
        names = [_REPLACEMENTS.get(n, n) for n in names]
        options = {_REPLACEMENTS.get(n, n): opts for n, opts in options.items()}
    if states:
        _register_state_pass()
        names = [_STATE_REPLACEMENTS.get(n, n) for n in names]
        options = {_STATE_REPLACEMENTS.get(n, n): opts for n, opts in options.items()}
        names.append("anefx::drop_identity_state_writes")
    out = ct.PassPipeline(pass_names=names, pipeline_name="anefx")
    for name, opts in options.items():
        out.set_options(name, opts)
    if op_selector is not None and fp16:
        cast = _REPLACEMENTS["common::add_fp16_cast"] if fast else "common::add_fp16_cast"
        out.set_options(cast, {"op_selector": op_selector})
    return out
