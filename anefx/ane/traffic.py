"""Where the bytes of one call go: a static memory-traffic ESTIMATE of a MIL function.

Decoding a token is bound by memory traffic, and no ANE is at hand to measure it; this estimate is
what anefx's choices of cache layout and attention form are made by. It reads a MIL function (a
converted or saved program) op by op and sums the bytes each op reads and writes.

The model of the hardware it assumes (assumptions, each an upper or a plain reading of public
facts, not measurements):

1. **No reuse between ops.** Every op reads each of its activation inputs from memory and writes
   each of its outputs to memory, once. The ANE compiler fuses some chains of elementwise ops; the
   estimate does not, so it is an upper bound on activation traffic.
2. **Activations are padded on their last axis to 64 bytes**, as the ANE lays tensors out
   (Apple, *Deploying Transformers on the Apple Neural Engine*, 2022: a last axis of one fp16 value
   occupies 64 bytes). Each value is counted at its own dtype's size (fp16: 2 bytes).
3. **Weights are read once per call**, however many ops use them, at their stored size (not
   padded; a compressed weight at its packed size: the constants of its ``constexpr_*`` op).
   A ``gather`` from a constant table (an embedding) reads the rows it returns, not the table.
4. **States are buffers the program reads and writes in place.** ``read_state`` and
   ``coreml_update_state`` move nothing themselves: the ops that consume a state's value read it
   (``state_read``) and the op whose result is written back wrote it (``state_written``). A
   ``slice_update`` whose input is a state's value and whose result goes back to the same state is
   done in place: it reads and writes the update only. That is how Core ML states are documented to
   behave for KV caches (Apple, "On Device Llama 3.1 with Core ML", 2024: in-place state updates);
   the one-hot form ``cache * (1 - onehot) + new * onehot`` is three ops over the whole cache.
5. **A view moves nothing.** A ``reshape``, ``expand_dims``, ``squeeze`` or ``transpose`` that
   copies no memory in that padded layout (:func:`anefx.analysis.layout.moves_data`: it keeps the
   last axis, or neither side pads it, or a transpose moves only unit axes) reads and writes no
   bytes; its consumers read its result at its own padded size. A (B, C, 1, 1) column viewed as
   (B, H, D, 1) is the same padded bytes read by whoever reads it. The others are copies, counted.
6. **The floor** of a call is its weights plus every state read once: what any program computing
   the same function must move.

Which bytes grow with the context is measured, not guessed: :func:`context_growth` compares the
same model compiled at two context lengths, op type by op type.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from anefx.analysis.layout import moves_data, padded_bytes

LABEL = "ESTIMATE (static: bytes each op reads and writes, weights once, last axis padded to 64 B)"
#: ops that read a row of a constant table rather than the whole table
GATHER_OPS = frozenset({"gather", "gather_along_axis", "gather_nd", "embedding"})
#: ops that only name a state (their traffic is counted at the ops that use the value)
STATE_ALIASES = frozenset({"read_state", "coreml_update_state"})
#: ops that only change a shape: free when :func:`anefx.analysis.layout.moves_data` says no copy
VIEW_OPS = frozenset({"reshape", "expand_dims", "squeeze", "transpose"})
_BITS = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class OpTraffic:
    """The bytes one MIL op moves. ``read`` includes ``state_read``; ``written`` includes
    ``state_written``; ``weights`` are the constants this op is the first to read."""

    name: str
    op_type: str
    read: int
    written: int
    weights: int = 0
    state_read: int = 0
    state_written: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written + self.weights


@dataclass
class Traffic:
    """The estimated bytes of one call of one function."""

    function: str
    ops: list[OpTraffic] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)  #: state name → its padded bytes

    @property
    def weight_bytes(self) -> int:
        return sum(o.weights for o in self.ops)

    @property
    def state_bytes(self) -> int:
        return sum(self.states.values())

    @property
    def read(self) -> int:
        """Activation and state bytes read (weights apart)."""
        return sum(o.read for o in self.ops)

    @property
    def written(self) -> int:
        return sum(o.written for o in self.ops)

    @property
    def state_read(self) -> int:
        return sum(o.state_read for o in self.ops)

    @property
    def state_written(self) -> int:
        return sum(o.state_written for o in self.ops)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.read + self.written

    @property
    def floor(self) -> int:
        """Weights plus every state read once."""
        return self.weight_bytes + self.state_bytes

    def by_op_type(self) -> dict[str, int]:
        """Bytes (read + written + weights) per MIL op type, largest first."""
        out: Counter = Counter()
        for o in self.ops:
            out[o.op_type] += o.total
        return dict(out.most_common())

    def largest(self, n: int = 10) -> list[OpTraffic]:
        return sorted(self.ops, key=lambda o: -o.total)[:n]

    def to_dict(self) -> dict:
        mb = 1e6
        return {
            "label": LABEL,
            "function": self.function,
            "total_mb": round(self.total / mb, 3),
            "weights_mb": round(self.weight_bytes / mb, 3),
            "read_mb": round(self.read / mb, 3),
            "written_mb": round(self.written / mb, 3),
            "state_mb": round(self.state_bytes / mb, 3),
            "state_read_mb": round(self.state_read / mb, 3),
            "state_written_mb": round(self.state_written / mb, 3),
            "floor_mb": round(self.floor / mb, 3),
            "times_floor": round(self.total / self.floor, 2) if self.floor else None,
            "by_op_type_mb": {k: round(v / mb, 3) for k, v in self.by_op_type().items()},
        }

    def __str__(self) -> str:
        d = self.to_dict()
        return (
            f"{self.function}: {d['total_mb']} MB per call ({d['times_floor']}x the floor of {d['floor_mb']} MB: "
            f"weights {d['weights_mb']} MB + states {d['state_mb']} MB); states read {d['state_read_mb']} MB, "
            f"written {d['state_written_mb']} MB [{LABEL}]"
        )


@dataclass(frozen=True)
class ContextGrowth:
    """How one function's bytes grow with the context, from two compiles that differ only in it.

    Traffic is affine in the context for these programs (every context-sized tensor is a fixed
    multiple of it), so two lengths determine it: ``growing`` is the part of ``total[1]`` that
    grows, ``state_bytes`` the states (the KV cache) at the longer context."""

    function: str
    contexts: tuple[int, int]
    totals: tuple[int, int]
    growing: int
    state_bytes: int
    floor: int
    by_op_type: dict[str, int]  #: growth of each op type's bytes, scaled to the longer context

    @property
    def share(self) -> float:
        """The fraction of the bytes at the longer context that grows with it."""
        return self.growing / self.totals[1] if self.totals[1] else 0.0

    @property
    def times_cache(self) -> float:
        """Growing bytes over the size of the states: 1.0 is the KV cache read once."""
        return self.growing / self.state_bytes if self.state_bytes else math.inf

    def to_dict(self) -> dict:
        mb = 1e6
        return {
            "label": LABEL,
            "function": self.function,
            "contexts": list(self.contexts),
            "total_mb": [round(t / mb, 3) for t in self.totals],
            "growing_mb": round(self.growing / mb, 3),
            "growing_share": round(self.share, 3),
            "states_mb": round(self.state_bytes / mb, 3),
            "growing_times_cache": round(self.times_cache, 2),
            "floor_mb": round(self.floor / mb, 3),
            "times_floor": round(self.totals[1] / self.floor, 2) if self.floor else None,
            "growing_by_op_type_mb": {k: round(v / mb, 3) for k, v in self.by_op_type.items()},
        }

    def __str__(self) -> str:
        d = self.to_dict()
        c0, c1 = self.contexts
        return (
            f"{self.function}: {d['total_mb'][0]} MB at context {c0}, {d['total_mb'][1]} MB at {c1}; "
            f"{d['growing_mb']} MB grows with the context ({100 * d['growing_share']:.0f}%), "
            f"{d['growing_times_cache']}x the {d['states_mb']} MB of states; {d['times_floor']}x the floor "
            f"[{LABEL}]"
        )


def context_growth(short: Traffic, short_context: int, long: Traffic, long_context: int) -> ContextGrowth:
    """The bytes of ``long`` that grow with the context, from the same function at two lengths."""
    if long_context <= short_context:
        raise ValueError(f"context_growth needs a longer second context, got {short_context} and {long_context}")
    scale = long_context / (long_context - short_context)
    a, b = short.by_op_type(), long.by_op_type()
    per_type = {t: int((b.get(t, 0) - a.get(t, 0)) * scale) for t in set(a) | set(b)}
    per_type = {t: n for t, n in sorted(per_type.items(), key=lambda kv: -kv[1]) if n}
    growing = int((long.total - short.total) * scale)
    return ContextGrowth(
        long.function,
        (short_context, long_context),
        (short.total, long.total),
        growing,
        long.state_bytes,
        long.floor,
        per_type,
    )


# ---- reading a MIL function -----------------------------------------------------------------------


def estimate_traffic(function, name: str = "main") -> Traffic:
    """The traffic of one call of a MIL function (coremltools' ``Function``, or any iterable of its
    operations), under the model of this module's docstring."""
    operations = list(_walk(function.operations if hasattr(function, "operations") else function))
    weight_sources = _weight_sources(operations)
    state_of: dict[str, str] = {}  # value name -> the state it was read from
    for op in operations:
        if op.op_type == "read_state":
            state_of[op.outputs[0].name] = _var(op.inputs["input"]).name
    written_back = {}  # value name -> the state it is written to
    for op in operations:
        if op.op_type == "coreml_update_state":
            written_back[_var(op.inputs["value"]).name] = _var(op.inputs["state"]).name

    traffic = Traffic(name)
    for op in operations:
        for key in ("input", "state"):
            var = op.inputs.get(key)
            if op.op_type in STATE_ALIASES and var is not None:
                v = _var(var)
                traffic.states.setdefault(v.name, _padded(v))
    seen_weights: set[str] = set()
    for op in operations:
        if op.op_type == "coreml_update_state" and op.outputs:  # its result is the state, as written
            state_of[op.outputs[0].name] = _var(op.inputs["state"]).name
        if op.op_type == "const" or op.op_type.startswith("constexpr_") or op.op_type in STATE_ALIASES:
            continue
        if _is_view(op):  # its consumers read the same bytes: a state's view is that state's
            if _var(op.inputs["x"]).name in state_of:
                state_of[op.outputs[0].name] = state_of[_var(op.inputs["x"]).name]
            traffic.ops.append(OpTraffic(op.name, op.op_type, 0, 0))
            continue
        read = state_read = weights = 0
        in_place = _in_place_update(op, state_of, written_back)
        for key, value in op.inputs.items():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                if var.name in weight_sources:
                    if op.op_type in GATHER_OPS and key == "x":
                        weights += sum(_padded(o) for o in op.outputs)  # the rows it reads
                    elif var.name not in seen_weights:
                        seen_weights.add(var.name)
                        weights += weight_sources[var.name]
                    continue
                if in_place and key == "x":
                    continue  # the state is updated where it lies
                n = _padded(var)
                read += n
                if var.name in state_of:
                    state_read += n
        if in_place:
            written = _padded(_var(op.inputs["update"]))
            state_of[op.outputs[0].name] = state_of[_var(op.inputs["x"]).name]  # the updated state, where it lies
        else:
            written = sum(_padded(o) for o in op.outputs)
        state_written = written if any(o.name in written_back for o in op.outputs) else 0
        traffic.ops.append(OpTraffic(op.name, op.op_type, read, written, weights, state_read, state_written))
    return traffic


def _walk(operations: Iterable):
    """Every op, nested blocks (``cond``, ``while_loop``) included, in order."""
    for op in operations:
        yield op
        for block in getattr(op, "blocks", ()) or ():
            yield from _walk(block.operations)


def _var(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _is_view(op) -> bool:
    """A shape-only op that copies no memory in the padded layout (assumption 5)."""
    if op.op_type not in VIEW_OPS or "x" not in op.inputs or not op.outputs:
        return False
    before, after = _shape(_var(op.inputs["x"])), _shape(op.outputs[0])
    if before is None or after is None:
        return False
    perm = None
    if op.op_type == "transpose":
        p = op.inputs.get("perm")
        if p is None or getattr(p, "val", None) is None:
            return False
        perm = [int(a) % len(before) for a in p.val]
    return not moves_data(before, after, perm)


def _in_place_update(op, state_of: dict[str, str], written_back: dict[str, str]) -> bool:
    """A ``slice_update`` of a state's value whose result is written back to that same state."""
    if not op.op_type.startswith("slice_update") or "x" not in op.inputs or "update" not in op.inputs:
        return False
    source = state_of.get(_var(op.inputs["x"]).name)
    return source is not None and written_back.get(op.outputs[0].name) == source


def _weight_sources(operations: list) -> dict[str, int]:
    """Value name → stored bytes, for constants and the dense weights ``constexpr_*`` ops unpack
    (counted at the bytes of their own constant inputs: the packed weight)."""
    sources: dict[str, int] = {}
    for op in operations:
        if op.op_type == "const":
            for out in op.outputs:  # integer and boolean literals are attributes (axes, shapes, flags)
                sources[out.name] = _stored_bytes(out) if _is_float(out) else 0
        elif op.op_type.startswith("constexpr_"):
            packed = 0
            for value in op.inputs.values():
                for var in value if isinstance(value, (list, tuple)) else (value,):
                    if var.name in sources:  # packed indices and tables, whatever their dtype
                        packed += sources[var.name] or _stored_bytes(var)
            for i, out in enumerate(op.outputs):
                sources[out.name] = packed if i == 0 else 0
    return sources


def _is_float(var) -> bool:
    from coremltools.converters.mil.mil import types

    dtype = getattr(var, "dtype", None)
    return dtype is not None and types.is_float(dtype)


def _bits(var) -> int:
    from coremltools.converters.mil.mil import types

    dtype = getattr(var, "dtype", None)
    if dtype is None:
        return 16
    name = types.builtin_to_string(dtype)
    if name == "bool":
        return 8
    m = _BITS.search(name or "")
    return int(m.group(1)) if m else 0  # strings and other non-tensor literals move nothing


def _shape(var) -> tuple[int, ...] | None:
    shape = getattr(var, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # a symbolic dimension: count it as one
        return tuple(int(s) if isinstance(s, int) else 1 for s in shape)


def _stored_bytes(var) -> int:
    shape = _shape(var)
    n = math.prod(shape) if shape else 1
    return -(-n * _bits(var) // 8)


def _padded(var) -> int:
    bits = _bits(var)
    if not bits:
        return 0
    return padded_bytes(_shape(var), max(1, bits // 8))
