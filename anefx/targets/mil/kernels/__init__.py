"""The kernel table of the MIL interpreter: MIL op type → a function computing it with torch (CPU).

Each module declares its kernels in one ``KERNELS`` dict (data, read here explicitly: nothing is
registered by importing a module). Ops that touch the interpreter's own state (``const``,
``read_state``, ``coreml_update_state``, ``cond``, ``while_loop``) are not kernels: the
interpreter runs them itself (:data:`anefx.targets.mil.interpreter.INTERPRETER_OPS`).
"""

from __future__ import annotations

from anefx.targets.mil.kernels import compression, elementwise, nn, recurrent, tensor
from anefx.targets.mil.kernels.base import Args


def _merge(*tables: dict) -> dict:
    merged: dict = {}
    for table in tables:
        clash = merged.keys() & table.keys()
        if clash:
            raise AssertionError(f"MIL kernels defined twice: {sorted(clash)}")
        merged.update(table)
    return merged


KERNELS = _merge(elementwise.KERNELS, tensor.KERNELS, nn.KERNELS, recurrent.KERNELS, compression.KERNELS)

__all__ = ["KERNELS", "Args"]
