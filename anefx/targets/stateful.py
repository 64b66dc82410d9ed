"""States: a pure function made stateful for a converter, and the converted program made pure again.

anefx validates pure functions: a function with states (a KV cache …) is a graph whose states are
ordinary inputs and outputs (``HandOff.states_in`` / ``states_out``), so every pass is checked on
random states. A converter wants the opposite: the states as buffers that the program reads and
writes in place (``torch.export`` records the writes as buffer mutations, which coremltools turns
into Core ML states: ``read_state`` / ``coreml_update_state``).

* :func:`stateful_module` wraps the pure graph: its value inputs become the wrapper's inputs (named
  as the hand-off names them: the converted program's input names), each state a buffer named
  after the state, each new state copied into its buffer, the value outputs returned. Every state
  of the program is a buffer of every function, in the program's order, so that the functions of
  one package declare the same states (one state object serves them all: an encoder-decoder's
  ``encode`` writes the cross-attention states its ``decode`` reads). A state the function does not
  write is written back unchanged: coremltools makes a buffer a state only when it is written (a
  buffer only read would be baked in as a constant), and its MIL pipeline then drops the identity
  write (:mod:`anefx.targets.mil_pipeline`).
* :func:`functional_view` turns the exported stateful program back into a pure GraphModule of the
  hand-off's signature (states as inputs and outputs, in the hand-off's order), so that the graph
  handed to the converter is validated by :func:`~anefx.targets.handoff.check_converter_input`
  exactly as a stateless one is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from anefx.ir.errors import ConversionError
from anefx.targets.handoff import HandOff, StateSpec


def _getitem(x, i):
    return x[i]


def stateful_module(
    graph_module: torch.fx.GraphModule, handoff: HandOff, states: Mapping[str, StateSpec]
) -> torch.fx.GraphModule:
    """``graph_module`` (the hand-off's pure graph, or a legalized clone of it) with its states as
    buffers written in place: inputs are the value inputs, outputs the value outputs."""
    root = torch.nn.Module()
    root.function = graph_module
    for state, spec in states.items():
        root.register_buffer(state, torch.zeros(spec.shape, dtype=spec.dtype))
    unknown = sorted({*handoff.states_in.values(), *handoff.states_out.values()} - set(states))
    if unknown:
        raise ConversionError(f"the function uses the states {unknown}, which the program does not declare")
    graph = torch.fx.Graph()
    args = []
    for name in handoff.input_names:
        state = handoff.states_in.get(name)
        args.append(graph.placeholder(name) if state is None else graph.get_attr(state))
    call = graph.call_module("function", tuple(args))
    values = []
    written = {}
    for k, name in enumerate(handoff.output_names):
        item = graph.call_function(_getitem, (call, k))
        state = handoff.states_out.get(name)
        if state is None:
            values.append(item)
        else:
            written[state] = item
    for state in states:  # in the program's order, so that every function lists its states alike
        buffer = graph.get_attr(state)
        # a state the function does not write is declared by an identity write (dropped in MIL)
        graph.call_method("copy_", (buffer, written.get(state, buffer)))
    graph.output(tuple(values))
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


def functional_view(ep: torch.export.ExportedProgram, handoff: HandOff) -> torch.fx.GraphModule:
    """The exported stateful program ``ep`` (of :func:`stateful_module`) as a pure GraphModule with the
    hand-off's signature: inputs in ``input_names`` order (states included), outputs in
    ``output_names`` order (new states included). Weights are read from ``ep`` (no copy)."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    source = ep.graph_module.graph
    placeholders = [n for n in source.nodes if n.op == "placeholder"]
    if len(placeholders) != len(sig.input_specs):
        raise ConversionError("the exported stateful program's inputs do not match its signature")
    state_of_input = {v: k for k, v in handoff.states_in.items()}  # state → hand-off input name
    values = iter(handoff.value_inputs)
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    by_input: dict[str, torch.fx.Node] = {}
    constants = []
    for node, spec in zip(placeholders, sig.input_specs, strict=True):
        if spec.kind == InputKind.USER_INPUT:
            by_input[next(values)] = node
        elif spec.kind == InputKind.BUFFER and spec.target in state_of_input:
            by_input[state_of_input[spec.target]] = node
        else:
            value = ep.state_dict.get(spec.target) if spec.kind != InputKind.CONSTANT_TENSOR else None
            if value is None:
                value = ep.constants[spec.target]
            constants.append((node, value))
    for name in handoff.input_names:
        node = by_input.get(name)
        if node is None:
            raise ConversionError(f"the exported stateful program has no input for {name!r}")
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for k, (node, value) in enumerate(constants):
        attr = f"w{k}"
        root.register_buffer(attr, value)
        env[node] = graph.get_attr(attr)
        env[node].meta = dict(node.meta)
    out_node = None
    for node in source.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out_node = node
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    outs = list(out_node.args[0])
    new_state = {s.target: outs[i] for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.BUFFER_MUTATION}
    user = iter(outs[i] for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.USER_OUTPUT)
    result = []
    for name in handoff.output_names:
        state = handoff.states_out.get(name)
        node = new_state.get(state) if state is not None else next(user)
        if node is None:
            raise ConversionError(f"the exported stateful program does not write the state {state!r}")
        result.append(env[node])
    graph.output(tuple(result))
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm
