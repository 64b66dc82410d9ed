"""Find where an executed program departs from the graph it was converted from.

Converted under :func:`anefx.compat.coremltools.names_apart`, each MIL op holding a torch node's
value carries the node's name (``gelu`` → ``gelu``, ``linear_1`` → ``linear_1``), whatever
coremltools' name counters stand at; its fp16 pass appends ``_cast_fp16`` and names the casts it
inserts ``…_to_fp16``, and an op of a node's decomposition extends the node's name
(``layer_norm_2_square``).
:func:`fx_name` reads a MIL name back into the node's name, and says whether the MIL value *is*
that node's value (the op the node's conversion ends with) or a step inside its conversion.

:func:`locate` runs the program with anefx's MIL interpreter one op at a time
(:meth:`MILProgram.run_steps`) and the graph (the converter's input, whose node names are the MIL
names) node by node alongside, on the same inputs. Each op whose value is a node's value is
compared with the node's value, relative to that value's scale, as the op runs. The first op that
differs by more than the tolerance is then checked *locally*: its node is run again in PyTorch on
the program's own values of its inputs. An op that is wrong by itself (a converter bug; a value
that overflows fp16, which PyTorch holds in fp32) differs locally too; an op that only inherits
the drift of the ops before it does not, and the walk goes on. The result (:class:`Divergence`)
names the MIL op, its torch node and the source line the node came from.

Memory: the walk holds what the two runs hold live, not their every value (every value of an
SD-1.5 UNet's chunk at latent 64: 3.3 GiB of per-head attention scores per self-attention, and
the check was killed at 17.1 GiB; the whole compile, check included, now peaks at 10.5 GiB).
Which op compares which node is known from the names before anything runs, so the walk knows when
each value is read for the last time: a node's graph value is held while a graph node not yet run
reads it or an op still to come compares with it (its own op, or a reader's local run); the
program's value of a node while a reader's op is still to come. The graph runs in the program's
order: each node when an op asks for its value, after the nodes it reads (coremltools converts the
nodes in the graph's order, then moves some casts and transposes next to their readers).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from anefx.analysis.ranges import FP16_MAX, finite_absmax
from anefx.ir.graph import describe, source_location

_SUFFIXES = re.compile(r"(_cast_fp16|_cast_fp32|_to_fp16|_to_fp32|_cast|_fp16)+$")


def fx_name(mil_name: str, fx_names: Collection[str]) -> tuple[str | None, bool]:
    """The torch node (of ``fx_names``) a MIL op or value comes from, and True when it holds that
    node's value (the last op of the node's conversion) rather than a step inside it;
    ``(None, False)`` for ops of no node (the casts of inputs, transposes coremltools adds …)."""
    base = _SUFFIXES.sub("", mil_name)
    if base in fx_names:
        return base, True
    cut = base.rfind("_")
    while cut > 0:
        prefix = base[:cut]
        if base[cut + 1 :].split("_")[0].isdigit():  # ``linear_10`` is another node than ``linear``'s
            cut = base.rfind("_", 0, cut)
            continue
        if prefix in fx_names:
            return prefix, False
        cut = base.rfind("_", 0, cut)
    return None, False


@dataclass
class Divergence:
    """Where the executed program first departs from the graph."""

    function: str
    position: int  #: the MIL op's index in its function
    op_type: str  #: the MIL op (``gelu``)
    mil_name: str  #: its name in the program
    node: str  #: the torch node it converts (``gelu``)
    torch_op: str  #: ``%gelu (aten.gelu) at model.py:12``
    location: str | None  #: ``model.py:12``
    error: float  #: max abs error / scale of the node's value (inf: inf or NaN)
    local: bool  #: the op differs when run on the program's own inputs (it is wrong by itself)
    overflow: bool  #: the value exceeds fp16's range (65,504) in PyTorch, or the program made inf/NaN
    absmax: float  #: largest finite magnitude of the node's value in PyTorch
    input_set: str = "example"

    def __str__(self) -> str:
        why = "overflows fp16" if self.overflow else ("is wrong by itself" if self.local else "drifts")
        error = "inf or NaN" if math.isinf(self.error) else f"{self.error:.3g} of its scale"
        return (
            f"The program departs from the graph at MIL op #{self.position} ({self.op_type} "
            f"'{self.mil_name}') of function '{self.function}', which computes {self.torch_op}: "
            f"error {error}, largest value {self.absmax:.4g} in PyTorch; it {why} [inputs: {self.input_set}]"
        )


def graph_inputs(gm: torch.fx.GraphModule, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """``gm``'s placeholders' values in their order, fed by name from ``inputs``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n.name for n in placeholders if n.name not in inputs]
    if missing:
        raise KeyError(f"no value for the graph's inputs {missing}; given {list(inputs)}")
    return [_as_tensor(inputs[n.name]) for n in placeholders]


class _Reference:
    """``gm`` run node by node as :meth:`value` asks for its nodes (each with the nodes it reads not
    yet run), so in the order the program's ops ask, each value held while a node still to run
    reads it or the walk still needs it: ``need`` maps a node's name to the index of the last op of
    the walk that reads its value; :meth:`walked` says an op is done. Nodes that neither the walk
    nor a node it asks for reads never run."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: Mapping[str, Any], need: Mapping[str, int]):
        self._interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
        self._values = self._interpreter.env  #: node → value, while held
        self._nodes = {n.name: n for n in gm.graph.nodes}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._values.update(zip(placeholders, graph_inputs(gm, inputs)))
        self._done: set[torch.fx.Node] = set(placeholders)
        runs: set[torch.fx.Node] = set()  # the nodes the walk reads and the nodes they read
        stack = [self._nodes[name] for name in need if name in self._nodes]
        while stack:
            node = stack.pop()
            if node not in runs:
                runs.add(node)
                stack.extend(node.all_input_nodes)
        self._readers = {n: sum(u in runs for u in n.users) for n in runs}  #: readers still to run
        self._need = need
        self._walked = -1
        self._freed_at: dict[int, list[torch.fx.Node]] = {}
        for name, i in need.items():
            if name in self._nodes:
                self._freed_at.setdefault(i, []).append(self._nodes[name])
        for node in placeholders:
            self._free(node)

    def value(self, name: str) -> torch.Tensor | None:
        """The node's tensor value (None for another kind of value, or no node of that name)."""
        node = self._nodes.get(name)
        if node is None:
            return None
        stack = [node]
        while stack:  # the node after the nodes it reads, depth first
            top = stack[-1]
            if top in self._done:
                stack.pop()
                continue
            waiting = [a for a in top.all_input_nodes if a not in self._done]
            if waiting:
                stack.extend(reversed(waiting))
            else:
                stack.pop()
                self._run(top)
        if node not in self._values:
            raise AssertionError(f"anefx bug: the value of {describe(node)} was freed before op {self._walked + 1}")
        value = self._values[node]
        return value if isinstance(value, torch.Tensor) else None

    def walked(self, i: int) -> None:
        """Op ``i`` of the walk is done: free what only it still needed."""
        self._walked = i
        for node in self._freed_at.pop(i, ()):
            self._free(node)

    def _run(self, node: torch.fx.Node) -> None:
        try:
            with torch.no_grad():
                self._values[node] = self._interpreter.run_node(node)
        except Exception as exc:
            exc.add_note(f"while running the reference graph's {describe(node)} to locate the program's departure")
            raise
        self._done.add(node)
        for arg in node.all_input_nodes:
            self._readers[arg] -= 1
            self._free(arg)
        self._free(node)

    def _free(self, node: torch.fx.Node) -> None:
        if self._readers.get(node, 0) == 0 and self._need.get(node.name, -1) <= self._walked:
            self._values.pop(node, None)


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| over the elements where ``want`` is finite; inf when ``got`` is
    inf or NaN where ``want`` is finite."""
    if not want.is_floating_point():
        return 0.0 if torch.equal(got.to(want.dtype), want) else math.inf
    e, a = want.double(), got.double()
    finite = torch.isfinite(e)
    if bool((finite & ~torch.isfinite(a)).any()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    diff = float((a - e).abs()[finite].max())
    scale = float(e.abs()[finite].max())
    return diff / scale if scale > 0 else (math.inf if diff > 0 else 0.0)


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """``value`` in ``ref``'s shape and dtype, or None when it holds another number of elements."""
    if value.numel() != ref.numel():
        return None
    return value.reshape(ref.shape).to(ref.dtype)


def locate(
    program,
    reference: torch.fx.GraphModule,
    inputs: Mapping[str, Any],
    *,
    function: str | None = None,
    state=None,
    tolerance: float = 1e-2,
    input_set: str = "example",
) -> Divergence | None:
    """The first op of ``program`` (a :class:`~anefx.targets.mil.MILProgram`) whose value departs
    from ``reference``'s (the graph it was converted from, its node names the MIL names) by more than
    ``tolerance`` of the value's scale *by itself* (see the module docstring); when no op does, the
    first op that differs at all (drift accumulated over several ops); None when none differs."""
    name = program.function_name(function)
    nodes = {n.name: n for n in reference.graph.nodes}
    operations = list(program.operations(name))
    compared = _compared_nodes(operations, nodes, _graph_outputs(reference, list(program.outputs(name))))
    # the last op reading each value: a node's graph value is read by its own ops and its readers'
    # (their local runs), the program's value of a node by its readers' ops
    graph_need: dict[str, int] = {}
    program_need: dict[str, int] = {}
    for i, node_name in enumerate(compared):
        if node_name is None:
            continue
        graph_need[node_name] = i
        if nodes[node_name].op == "call_function":
            for arg in nodes[node_name].all_input_nodes:
                graph_need[arg.name] = program_need[arg.name] = i
    graph = _Reference(reference, inputs, graph_need)
    held: dict[str, Any] = {}  #: node name → the program's value of it, while a reader's op is to come
    dropped_at: dict[int, list[str]] = {}
    for node_name, i in program_need.items():
        dropped_at.setdefault(i, []).append(node_name)
    first_drift: Divergence | None = None
    for i, (op, live) in enumerate(program.run_steps(inputs, name, state)):
        if i == 0:  # the program's inputs hold the placeholders' values
            held.update({n: live.get(n) for n in inputs if n in program_need})
        node_name = compared[i]
        if node_name is not None:
            value = live.get(op.outputs[0])
            if program_need.get(node_name, -1) > i:
                held[node_name] = value
            else:
                held.pop(node_name, None)
            found = _compare(op, nodes[node_name], value, graph, held, tolerance)
            if found is not None:
                found = dataclasses.replace(found, function=name, input_set=input_set)
                if found.local:
                    return found
                first_drift = first_drift or found
        graph.walked(i)
        for gone in dropped_at.pop(i, ()):
            held.pop(gone, None)
    return first_drift


def _compared_nodes(operations, nodes: Mapping[str, torch.fx.Node], results: Mapping[str, str]) -> list[str | None]:
    """For each op, the node whose value it holds (and is compared with), or None."""
    named = {n for op in operations for n, exact in (fx_name(op.name, nodes),) if exact}
    compared: list[str | None] = []
    for op in operations:
        node_name, exact = fx_name(op.name, nodes)
        if op.outputs and op.outputs[0] in results:  # the op writing a program output holds the graph's
            node_name, exact = results[op.outputs[0]], True
        elif node_name is None and op.outputs:  # an op of coremltools' own (``cast_4``) holding a node's value
            node_name, exact = fx_name(op.outputs[0], nodes)
        if node_name is None:
            node_name, exact = _first_of_its_type(op.name, nodes, named)
        compared.append(node_name if node_name is not None and exact and op.outputs else None)
    return compared


def _compare(
    op, node: torch.fx.Node, value: Any, graph: _Reference, held: Mapping[str, Any], tolerance: float
) -> Divergence | None:
    """``op``'s value against ``node``'s: a :class:`Divergence` (its function and input set left to
    the caller) when it differs by more than ``tolerance``."""
    want = graph.value(node.name)
    if want is None or not isinstance(value, torch.Tensor):
        return None
    got = _like(value, want)
    if got is None:
        return None
    error = _relative_error(got, want)
    if error <= tolerance:
        return None
    local = _local_error(node, value, graph, held)
    absmax = finite_absmax(want)
    return Divergence(
        "",
        op.position,
        op.op_type,
        op.name,
        node.name,
        describe(node),
        source_location(node),
        error,
        local is None or local > tolerance,
        absmax > FP16_MAX or (not bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())),
        absmax,
    )


def _first_of_its_type(mil_name: str, nodes: Collection[str], named: Collection[str]) -> tuple[str | None, bool]:
    """A program converted outside :func:`anefx.compat.coremltools.names_apart` (``ct.convert`` alone,
    read by ``anefx check``): coremltools names a node's op from its counter per op type, which a
    fresh process starts at 0, so ``linear_0`` is the node ``linear``, unless an op of the program
    already carries that node's own name (the counter then stood elsewhere, and this is no guess to
    make)."""
    base = _SUFFIXES.sub("", mil_name)
    if base.endswith("_0") and base[:-2] in nodes and base[:-2] not in named:
        return base[:-2], True
    return None, False


def _graph_outputs(reference: torch.fx.GraphModule, program_outputs: list[str]) -> dict[str, str]:
    """Program output name → the graph node it is (by position, when the counts agree)."""
    out = next(n for n in reversed(reference.graph.nodes) if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    if len(args) != len(program_outputs):
        return {}
    return {p: a.name for p, a in zip(program_outputs, args) if isinstance(a, torch.fx.Node) and a.op != "placeholder"}


def _local_error(node: torch.fx.Node, value: torch.Tensor, graph: _Reference, held: Mapping[str, Any]) -> float | None:
    """The error of the program's ``value`` of ``node`` against ``node`` run in PyTorch on the
    program's values of its inputs (``held``; the graph's own value for an input the program does
    not hold); None when the node cannot be run alone."""
    if node.op != "call_function":
        return None

    def value_of(arg: torch.fx.Node):
        ref = graph.value(arg.name)
        mil = held.get(arg.name)
        if ref is not None and isinstance(mil, torch.Tensor):
            same = _like(mil, ref)
            if same is not None:
                return same
        return ref

    try:
        args = torch.fx.node.map_arg(node.args, value_of)
        kwargs = torch.fx.node.map_arg(dict(node.kwargs), value_of)
        with torch.no_grad():
            out = node.target(*args, **kwargs)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor):
        return None
    mil = _like(value, out)
    return None if mil is None else _relative_error(mil, out)


#: ops whose output error is the absolute error of their argument (a sine reads it modulo 2π)
PERIODIC = frozenset({torch.ops.aten.sin.default, torch.ops.aten.cos.default})


def fp16_region(
    divergence: Divergence,
    reference: torch.fx.GraphModule,
    absmax: Mapping[str, float],
    tolerance: float = 1e-2,
) -> set[str]:
    """The torch nodes to compute in fp32 for an fp16 failure at ``divergence``: its node and,
    while a node of the region holds a value beyond fp16's range in PyTorch (``absmax``: node name →
    the largest finite magnitude of its floating value, :func:`~anefx.analysis.ranges.value_ranges`
    on the failing input set), every op that reads it
    (a square that overflows, then the mean that reads it …): the region ends where values fit
    fp16 again. A periodic op of the region (``sin``, ``cos``) takes its argument's computation
    with it wherever fp16 would round that argument by more than ``tolerance`` (a value of
    magnitude A by up to A·2⁻¹¹: diffusers' timestep times its frequencies, up to ~1,000), with
    the argument's other periodic readers (the cosine of the same argument)."""
    nodes = {n.name: n for n in reference.graph.nodes}
    region = {divergence.node}
    frontier = [nodes[divergence.node]]
    while frontier:
        node = frontier.pop()
        if absmax.get(node.name, 0.0) <= FP16_MAX:
            continue
        for user in node.users:
            if user.name not in region and user.op == "call_function":
                region.add(user.name)
                frontier.append(user)
    return region | _periodic_arguments(region, nodes, absmax, tolerance)


def _periodic_arguments(region, nodes, absmax: Mapping[str, float], tolerance: float) -> set[str]:
    """The ops computing the arguments of the region's periodic ops, upstream while fp16 would
    round their values by more than ``tolerance``, and the periodic ops reading them."""
    added: set[str] = set()
    frontier = [a for name in region if nodes[name].target in PERIODIC for a in nodes[name].all_input_nodes]
    while frontier:
        node = frontier.pop()
        magnitude = absmax.get(node.name)  # None: no floating value
        if node.op != "call_function" or node.name in added or magnitude is None:
            continue
        if magnitude * 2.0**-11 <= tolerance:
            continue
        added.add(node.name)
        added |= {u.name for u in node.users if u.target in PERIODIC}
        frontier.extend(node.all_input_nodes)
    return added


def fp32_selector(fx_names: Collection[str], region: Collection[str]):
    """An ``op_selector`` for coremltools' fp16 cast pass: False (keep fp32) for the MIL ops of the
    torch nodes in ``region`` (their conversions' every op), True for every other op."""
    names, keep = set(fx_names), set(region)

    def select(op) -> bool:
        node, _ = fx_name(op.name, names)
        return node not in keep

    return select
