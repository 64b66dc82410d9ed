"""The private coremltools APIs anefx relies on, each behind one function (pinned by ``tests/test_compat.py``).

* ``MLModel._mil_program``: the MIL program of a model converted in this process (its functions,
  blocks and operations; what op histograms, compression and the ANE report read), and dropping it
  to free its weights (:func:`drop_in_memory_program`; read back from the model's package after).
* ``palettize_weights._get_lut_and_indices``: coremltools' own k-means, called per weight group so
  that two programs holding the same weight get the same tables (``SharedKMeans``).
* ``frontend.torch.ops._get_inputs``: a torch op converter's inputs (anefx's own ops' converters).
* ``PassPipeline._pass_options``: the options of each pass of a MIL pass pipeline.
* ``quiet_coremltools`` / ``coremltools_module``: coremltools' chatter goes to its own logger and to
  tqdm bars on stderr (no switch); how to silence both (also while importing it) is coremltools
  behaviour, kept here.
* ``FP16ComputePrecision.fp16_overflow`` (``defs.quantization``): the overflow check of
  ``common::add_fp16_cast``, which anefx's faster equivalent pass overrides.
* ``converters.mil.frontend.milproto.load``: a saved ML Program's protobuf and weight blobs back into a
  MIL ``Program`` (every function; optional op inputs filled with their defaults; a state write read
  back as ``coreml_update_state``): what anefx's MIL interpreter executes.
* ``Builder._get_free_name`` (``converters.mil.mil.builder``): the name coremltools gives an op created
  without one (``add_0``, ``add_1`` …: one process-wide counter per op type), which
  ``names_apart`` keeps off the torch graph's node names; ``TranscriptionContext.add``
  (``frontend.torch.converter``): where a torch op converter registers a node's value, where
  ``names_apart`` names the value's op after the node.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
import weakref
from typing import Any

#: the last program read back from a released model's package: ``(weakref to the model, program)``.
#: One at a time: repeated reads of the same model (its op histogram, its ANE report, its traffic)
#: parse its package once, and at most one released program's weights are back in memory.
_read_back: list = []


def mil_program(mlmodel):
    """The MIL ``Program`` of a model converted (or compressed) in this process: the one coremltools
    keeps in memory, or, once :func:`drop_in_memory_program` dropped it, read back from the model's own
    package (its protobuf and weight blobs), kept until another released model is read
    (:func:`forget_read_back` drops it)."""
    program = getattr(mlmodel, "_mil_program", None)
    if program is None and getattr(mlmodel, "__dict__", {}).get("_anefx_released"):
        if _read_back and _read_back[0][0]() is mlmodel:
            return _read_back[0][1]
        forget_read_back()  # the previous one first: never two read back at once
        program = program_from_spec(mlmodel.get_spec(), str(mlmodel.weights_dir))
        _read_back[:] = [(weakref.ref(mlmodel), program)]
        return program
    if program is None:
        raise AttributeError(
            "this MLModel has no MIL program in memory (coremltools keeps it only for models converted or "
            "compressed in this process, not for packages loaded from disk)"
        )
    return program


def forget_read_back() -> None:
    """Drop the program :func:`mil_program` last read back from a released model's package, and
    collect it now (a coremltools ``Program`` is a web of cycles holding its weights)."""
    if _read_back:
        _read_back.clear()
        gc.collect()


def drop_in_memory_program(mlmodel) -> None:
    """Drop the MIL program coremltools keeps in memory after converting (its weights as numpy
    arrays: as large as the package's weights); :func:`mil_program` then reads it back from the
    model's package on disk when asked (the last one read stays). For programs of several
    functions, which would otherwise hold every function's weights twice (in memory and staged)."""
    if getattr(mlmodel, "_mil_program", None) is not None and getattr(mlmodel, "weights_dir", None):
        mlmodel._mil_program = None
        mlmodel._anefx_released = True


def released(mlmodel) -> bool:
    """Whether :func:`drop_in_memory_program` dropped ``mlmodel``'s in-memory program."""
    return bool(getattr(mlmodel, "__dict__", {}).get("_anefx_released"))


def operations(mlmodel, function: str = "main") -> list:
    """The operations of one function's main block, in order."""
    return list(mil_program(mlmodel).functions[function].operations)


def kmeans_lut_and_indices(values, nbits: int):
    """coremltools' k-means palettization of one weight group: ``(lut, indices)`` as
    ``palettize_weights`` computes them in its ``kmeans`` mode."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    return palettize_weights._get_lut_and_indices(values, "KMEANS", nbits, None)


def torch_node_inputs(context, node, expected: int) -> list:
    """The converted inputs of a torch node inside a registered op converter."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    return _get_inputs(context, node, expected=expected)


def pass_options(pipeline) -> dict[str, dict[str, Any]]:
    """Each pass's options of a ``ct.PassPipeline``: pass name → {option name: value}."""
    return {name: {o.option_name: o.option_val for o in opts} for name, opts in pipeline._pass_options.items()}


def fp16_cast_pass():
    """The class of ``common::add_fp16_cast`` (``FP16ComputePrecision``): subclasses override its static
    ``fp16_overflow(op) -> bool``."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    return FP16ComputePrecision


def inplace_pattern_pass():
    """The class of ``common::canonicalize_inplace_pattern``: its
    ``_try_match_and_transform_pattern(op, block, block_operation_list)`` places each
    ``coreml_update_state`` before the op that follows the state's value in ``block_operation_list``
    (its own copy of the block's ops, taken before the pass moved any)."""
    from coremltools.converters.mil.mil.passes.defs.optimize_state import canonicalize_inplace_pattern

    return canonicalize_inplace_pattern


@contextlib.contextmanager
def names_apart(taken):
    """While converting: a MIL name that is one of ``taken`` (the converted graph's node names) is that
    node's op, and every op holding a node's value carries the node's name.

    Lowering one torch node into several MIL ops (``aten.group_norm``: ``reshape``, ``reduce_mean`` …
    ``mul``, ``add``), coremltools names the inner ops ``<op type>_<n>`` from a counter per op type
    (process-wide: reset only after a conversion that completes); such a name may be a node's
    (``add_1``), and the node's own op is then renamed ``add_1_1`` when the program is written. Here
    the counter skips the taken names. Some converters name only the value after the node and leave
    its op the made-up name (``linear``: op ``linear_<n>``, ``<n>`` wherever the counter stands);
    such an op is renamed after its node when the converter registers the value
    (``TranscriptionContext.add``). Every MIL name anefx maps back to a torch node (the artifact
    check's localisation, the fp16 fallback's fp32 ops, the ANE report's source lines) is then the
    node's name, or the node's name extended (``layer_norm_2_square``, ``linear_cast_fp16``), never a
    counter's guess."""
    from coremltools.converters.mil.frontend.torch.converter import TranscriptionContext
    from coremltools.converters.mil.mil.builder import Builder

    taken = frozenset(taken)
    original = Builder.__dict__["_get_free_name"]
    original_add = TranscriptionContext.__dict__["add"]

    def free_name(cls, name):
        while True:
            new = original.__func__(cls, name)
            if new not in taken:
                return new

    def add(self, ssa_var, torch_name=None, override=False):
        op = getattr(ssa_var, "op", None)
        name = ssa_var.name if torch_name is None else torch_name
        if (  # the node's value, from an op of a made-up name that has no other output
            op is not None
            and name in taken
            and ssa_var.name == name
            and op.name != name
            and op.name not in taken
            and len(op.outputs) == 1
        ):
            op.name = name
        return original_add(self, ssa_var, torch_name, override)

    Builder._get_free_name = classmethod(free_name)
    TranscriptionContext.add = add
    try:
        yield
    finally:
        Builder._get_free_name = original
        TranscriptionContext.add = original_add


@contextlib.contextmanager
def quiet_coremltools(progress_bars: bool = False):
    """Silence coremltools' chatter while it imports or converts.

    Its messages (no native libs on Linux, untested torch, unsupported scikit-learn) go through its own
    ``coremltools`` logger, and only that logger is lowered. Its progress bars are tqdm bars on
    ``sys.stderr`` with no switch (tqdm reads ``TQDM_DISABLE`` once, at import), so while converting
    stderr is redirected too unless ``progress_bars`` is True."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.nullcontext() if progress_bars else contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def coremltools_module():
    """``import coremltools``, without the warnings and log lines it prints while importing."""
    with warnings.catch_warnings(), quiet_coremltools(progress_bars=True):
        warnings.simplefilter("ignore")
        import coremltools

    return coremltools


def program_from_spec(spec, weights_dir: str):
    """The MIL ``Program`` of a ``Model`` protobuf (an ML Program) whose weight blobs are in ``weights_dir``."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    return milproto.load(spec, spec.specificationVersion, file_weights_dir=weights_dir)
