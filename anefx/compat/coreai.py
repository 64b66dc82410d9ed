"""The private coreai APIs anefx relies on, each behind one function (pinned by ``tests/test_compat.py``).

* ``Program._get_graph(name)``: the MLIR graph of one function of a converted Core AI program.
* ``coreai._compiler.ir.WalkResult``: walking every op of that graph.
"""

from __future__ import annotations

from collections.abc import Callable


def function_graph(program, name: str = "main"):
    """The MLIR graph (an op with regions) of function ``name`` of a converted ``coreai`` program."""
    return program._get_graph(name)


def walk(program, visit: Callable, name: str = "main") -> None:
    """Call ``visit(op)`` for every op of function ``name``, nested ops included."""
    from coreai._compiler.ir import WalkResult

    def step(op):
        visit(op)
        return WalkResult.ADVANCE

    function_graph(program, name).walk(step)
