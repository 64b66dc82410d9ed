"""What a kernel gets: the op's inputs by parameter name, and helpers to read constant parameters.

A kernel is a plain function ``kernel(a: Args) -> value | tuple of values``. ``a.x`` is the value of
the op's input ``x``: a ``torch.Tensor`` (floating tensors are float32 holding values of the declared
precision: an fp16 tensor holds fp16 values, see :mod:`anefx.targets.mil.interpreter`), a ``str`` for
string parameters (``pad_type``, ``mode`` …), a list for tuple inputs (``concat``'s ``values``), or
``None`` for an optional input the program leaves out. The interpreter casts and rounds what a kernel
returns to the dtype the program declares for each output, so a kernel computes in whatever precision
is convenient (float32 for floating values).
"""

from __future__ import annotations

import torch


class Args:
    """An op's inputs by parameter name; a missing optional input reads as ``None``."""

    __slots__ = ("_values",)

    def __init__(self, values: dict):
        self._values = values

    def __getattr__(self, name: str):
        return self._values.get(name)

    def __contains__(self, name: str) -> bool:
        return self._values.get(name) is not None


def to_ints(value) -> list[int] | None:
    """A constant integer tensor (or list) as a list of ints; a scalar gives a one-element list."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def to_int(value, default: int | None = None) -> int | None:
    return default if value is None else int(value)


def to_float(value, default: float | None = None) -> float | None:
    return default if value is None else float(value)


def to_bool(value, default: bool = False) -> bool:
    return default if value is None else bool(value)


def axis_of(axis: int, rank: int) -> int:
    """``axis`` counted from the front (MIL allows negative axes)."""
    return axis + rank if axis < 0 else axis


def channel_view(param: torch.Tensor, rank: int, axis: int = 1) -> torch.Tensor:
    """A per-channel parameter of shape ``(C,)`` shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return param.reshape(shape)
