"""An ``ExportedProgram`` made from anefx's graph directly, without tracing it again.

anefx's graph came out of ``torch.export`` (unlifted by ``ExportedProgram.module()``) and every pass
keeps it functional ATen with shape metadata, so exporting it a second time and running
``run_decompositions({})`` (a full re-trace, about a fifth of the Core ML hand-off on DistilBERT)
reproduces the same graph. :func:`lifted_program` does what the re-export's result contains instead:
weights and constants read by ``get_attr`` become lifted placeholders named in the graph signature,
outputs are flattened, and torch's own ``Verifier`` checks the result when the program is built.

When the graph holds something this cannot express (a non-tensor attribute, a non-tensor output), it
returns None and the caller re-exports. ``tests/test_coreml_target.py`` checks that both routes give
op for op the same Core ML program.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument

from anefx.compat.torch import exported_program, non_persistent_buffers, pytree_info, rename_node, tree_leaves

aten = torch.ops.aten
#: Non-core overloads export keeps and ``run_decompositions`` would rewrite: respelled here the same way.
_TO = {aten.to.device, aten.to.dtype, aten.to.dtype_layout}

_ORDER = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2}


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _respell_casts(graph: torch.fx.Graph) -> None:
    """``aten.to`` (a composite op) as the ``aten._to_copy`` it decomposes into."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _TO:
            continue
        src, out = node.args[0], node.meta.get("val")
        before = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(out, torch.Tensor) or not isinstance(before, torch.Tensor) or out.device != before.device:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten._to_copy.default, (src,), {"dtype": out.dtype})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def lifted_program(gm: torch.fx.GraphModule) -> ExportedProgram | None:
    """``gm`` (which this takes over: pass a clone) as an ATen-dialect ``ExportedProgram``, or None."""
    graph = gm.graph
    _respell_casts(graph)
    info = pytree_info(graph)
    if info is None or info.in_spec is None or info.out_spec is None:
        return None
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    users = [n for n in graph.nodes if n.op == "placeholder"]
    if any("val" not in n.meta for n in users):
        return None
    reads: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            reads.setdefault(str(node.target), []).append(node)
        elif node.op == "call_module":
            return None
    lifted = []
    for target, nodes in reads.items():
        value = _attr(gm, target)
        if not isinstance(value, torch.Tensor):
            return None
        kind = (
            InputKind.PARAMETER
            if target in params
            else InputKind.BUFFER
            if target in buffers
            else InputKind.CONSTANT_TENSOR
        )
        lifted.append((_ORDER[kind], target, kind, value, nodes))
    lifted.sort(key=lambda x: x[0])

    specs, state, constants = [], {}, {}
    last = None  # placeholders come first: lifted ones, then the user's (passes may have put nodes between)
    for _, target, kind, value, nodes in lifted:
        prefix = "c_" if kind == InputKind.CONSTANT_TENSOR else "p_"
        with graph.inserting_before(next(iter(graph.nodes))) if last is None else graph.inserting_after(last):
            last = ph = graph.placeholder(prefix + target.replace(".", "_"))
        ph.meta["val"] = nodes[0].meta.get("val")
        if ph.meta["val"] is None:
            ph.meta["val"] = torch.empty_like(value, device="meta")
        for n in nodes:
            n.replace_all_uses_with(ph)
            graph.erase_node(n)
        persistent = kind != InputKind.BUFFER or target not in non_persistent_buffers(gm)
        specs.append(InputSpec(kind, TensorArgument(ph.name), target, persistent if kind == InputKind.BUFFER else None))
        (constants if kind == InputKind.CONSTANT_TENSOR else state)[target] = value
    for n in users:
        if last is not None:
            last.append(n)
        last = n
    specs += [InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in users]

    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = tree_leaves(out.args[0])
    if not all(isinstance(n, torch.fx.Node) for n in flat):
        return None
    out.args = (tuple(flat),)
    outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None) for n in flat]
    try:
        return exported_program(gm, graph, specs, outputs, state, constants, info.in_spec, info.out_spec)
    except Exception:  # torch's verifier refused it: the caller re-exports
        return None


def keep_input_names(before: ExportedProgram, after: ExportedProgram) -> ExportedProgram:
    """``after`` (``before`` re-traced, e.g. by ``run_decompositions``) with ``before``'s user-input
    names: the re-trace names positional inputs ``arg_0`` …, and coremltools names the model's inputs
    after them."""
    old = [s.arg.name for s in before.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    specs = [s for s in after.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    taken = {n.name for n in after.graph.nodes} - {s.arg.name for s in specs}
    if len(old) != len(specs) or taken & set(old):
        return after
    nodes = {n.name: n for n in after.graph.nodes if n.op == "placeholder"}
    for spec, name in zip(specs, old):
        if spec.arg.name != name:
            rename_node(nodes[spec.arg.name], name)
            spec.arg.name = name
    after.graph_module.recompile()
    return after
