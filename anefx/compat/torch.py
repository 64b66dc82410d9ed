"""The private torch APIs anefx relies on, each behind one function (pinned by ``tests/test_compat.py``).

* ``torch.utils._pytree``: flattening nested inputs and outputs (the module torch.export itself uses;
  torch has no public pytree module).
* ``Graph._codegen.pytree_info``: a GraphModule's input and output specs (how its flat placeholders map
  to the model's ``(args, kwargs)`` and its outputs to the model's structure); setting a plain
  ``CodeGen`` makes the outputs a flat tuple.
* ``Node._rename``: renaming a placeholder in place (names become the converted model's input names).
* ``torch._subclasses.FakeTensorMode`` and ``torch._guards.detect_fake_mode``: shape metadata.
* ``torch._ops.OpOverload`` / ``OpOverloadPacket`` and their ``_schema``, ``_overloadname``,
  ``_qualified_op_name``: what an ATen op reads, writes and is called.
* ``nn.Module._non_persistent_buffers_set``: which buffers a state dict leaves out.
* ``ExportedProgram(...)``: a program built from a graph directly (:func:`exported_program`).
* dynamo's ``_dynamo_static_input_type`` tensor-dict entry: parameters lifted into a backend's inputs.
* ``Tensor._version``: the counter every in-place write increments (that a run left its inputs as
  they were).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as _pytree

# -- pytrees -----------------------------------------------------------------------------------
tree_flatten = _pytree.tree_flatten
tree_flatten_with_path = _pytree.tree_flatten_with_path
tree_leaves = _pytree.tree_leaves
tree_unflatten = _pytree.tree_unflatten


# -- a GraphModule's calling convention ----------------------------------------------------------
def pytree_info(graph: torch.fx.Graph):
    """The graph's ``PyTreeInfo`` (``orig_args``, ``in_spec``, ``out_spec``), or None when its code
    takes and returns flat values (a ``symbolic_trace`` graph, a graph built by hand)."""
    return getattr(graph._codegen, "pytree_info", None)


def set_flat_io(graph: torch.fx.Graph) -> None:
    """Make ``graph`` take flat placeholders and return its output node's args as they are (a plain
    tuple), dropping any pytree structure (after a rewrite changed the output structure)."""
    graph._codegen = torch.fx.graph.CodeGen()


def rename_node(node: torch.fx.Node, name: str) -> None:
    """Rename ``node`` in place (its graph's namespace is updated; code uses the new name)."""
    node._rename(name)


# -- fake tensors --------------------------------------------------------------------------------
def fake_mode(allow_non_fake_inputs: bool = True):
    """A new ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=allow_non_fake_inputs)


def detect_fake_mode(values: Sequence[Any]):
    """The fake mode the FakeTensors among ``values`` belong to, or None."""
    from torch._guards import detect_fake_mode as detect

    return detect(list(values))


# -- ATen operators ------------------------------------------------------------------------------
def is_op_overload(target) -> bool:
    """Whether ``target`` is an ATen (or custom) operator overload such as ``aten.add.Tensor``."""
    return isinstance(target, torch._ops.OpOverload)


def is_op_packet(target) -> bool:
    """Whether ``target`` is an operator packet such as ``aten.add`` (all overloads)."""
    return isinstance(target, torch._ops.OpOverloadPacket)


def op_schema(target) -> torch.FunctionSchema:
    """The schema of an operator overload (name, arguments, returns, alias annotations)."""
    return target._schema


def overload_name(target) -> str:
    """``"Tensor"`` for ``aten.add.Tensor``; ``"default"`` for ``aten.relu.default``."""
    return target._overloadname


def packet_name(packet) -> str:
    """``"aten::add"`` for the packet ``aten.add``."""
    return packet._qualified_op_name


# -- modules and programs ------------------------------------------------------------------------
def non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    """Names of ``module``'s own buffers registered with ``persistent=False``."""
    return set(getattr(module, "_non_persistent_buffers_set", set()))


def exported_program(
    root: torch.nn.Module,
    graph: torch.fx.Graph,
    input_specs: list,
    output_specs: list,
    state_dict: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    in_spec,
    out_spec,
) -> torch.export.ExportedProgram:
    """An ATen-dialect ``ExportedProgram`` over ``graph`` (whose placeholders follow ``input_specs``),
    built without tracing. torch's own verifier checks it; it raises when the graph does not verify."""
    from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import ExportGraphSignature

    signature = ModuleCallSignature(inputs=[], outputs=[], in_spec=in_spec, out_spec=out_spec)
    return ExportedProgram(
        root=root,
        graph=graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints={},
        module_call_graph=[ModuleCallEntry("", signature)],
        constants=constants,
    )


# -- dynamo --------------------------------------------------------------------------------------
def is_dynamo_static_input(node: torch.fx.Node) -> bool:
    """Whether dynamo marked the placeholder ``node`` as a static input (a parameter or buffer it
    lifted into the graph's inputs)."""
    return bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))


def write_count(t: torch.Tensor) -> int:
    """How many times ``t`` (or a view sharing its storage's counter) was written in place."""
    return t._version
