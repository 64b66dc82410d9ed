"""Small helpers over ``torch.fx`` graphs shared by capture, passes, validation and targets.

Nothing here knows about a particular pass or target: these are the graph facts every layer needs
(cloning without copying weights, shape metadata, op histograms, where a node came from).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import operator
import os
import re
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from anefx.compat.torch import (
    detect_fake_mode,
    fake_mode,
    is_op_overload,
    is_op_packet,
    op_schema,
    packet_name,
    tree_leaves,
)

aten = torch.ops.aten


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph that *shares* its parameters and buffers.

    Passes edit the copy; rolling a pass back is dropping the copy. Weights are never duplicated
    (a deepcopy would double the memory of a large model).
    """
    with warnings.catch_warnings():  # deepcopy of pytree specs warns about a deprecated alias
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)  # node_copy shares meta values; weights stay on gm
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("meta",):
        if hasattr(gm, attr):
            setattr(new, attr, dict(getattr(gm, attr)))
    return new


def refresh_meta(gm: torch.fx.GraphModule, flat_inputs: Iterable[torch.Tensor]) -> None:
    """Recompute ``node.meta["val"]`` (FakeTensors) for every node from the flat example inputs."""
    mode = fake_mode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in flat_inputs]
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def val(node: torch.fx.Node):
    """The FakeTensor (or other value) recorded for ``node``, or None.

    Nodes a pass just created get their metadata here, on first use (see :func:`call`)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if "val" not in node.meta and "tensor_meta" not in node.meta and node.op == "call_function":
        _infer_lazily(node)
    return node.meta.get("val", node.meta.get("tensor_meta"))


def _infer_lazily(node: torch.fx.Node) -> None:
    """Infer ``node``'s metadata and, first, that of the inputs that lack it (an explicit DFS)."""
    pending = [node]
    while pending:
        n = pending[-1]
        if "val" in n.meta:
            pending.pop()
            continue
        missing = [i for i in n.all_input_nodes if "val" not in i.meta and i.op == "call_function"]
        if missing:
            pending.extend(missing)
            continue
        pending.pop()
        try:
            infer_meta(n)
        except Exception:  # leave it unknown; the pipeline refreshes metadata after the pass
            pass
        n.meta.setdefault("val", None)  # also when no input had a FakeTensor (all constants): never retried


def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The static shape of ``node``'s tensor value, or None when unknown or symbolic."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in v.shape)
    except (TypeError, RuntimeError):
        return None


def rank(node) -> int | None:
    """The number of dimensions of ``node``'s tensor value, or None when unknown."""
    s = shape(node) if isinstance(node, torch.fx.Node) else None
    return len(s) if s is not None else None


def replace_node(graph: torch.fx.Graph, old: torch.fx.Node, new, *, keep_meta: bool = False) -> None:
    """Send every use of ``old`` to ``new`` and erase ``old``; ``keep_meta`` moves its metadata
    (shape, provenance) onto ``new`` when ``new`` computes the same value."""
    if keep_meta and isinstance(new, torch.fx.Node):
        new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def node_arg(node: torch.fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of ``node``, given by position ``index`` or by keyword (``default`` when absent)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def views_to_reshapes(node: torch.fx.Node) -> None:
    """The model's own ``view`` of ``node`` becomes a ``reshape`` (the same values): once a rewrite
    computes ``node`` through a permute, a view of it raises ("Cannot view a tensor with shape …")."""
    for user in node.users:
        if user.op == "call_function" and user.target == aten.view.default and user.args[0] is node:
            user.target = aten.reshape.default


def dtype(node: torch.fx.Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def op_name(node: torch.fx.Node) -> str:
    """A stable short name for a node's operation: ``aten.linear``, ``placeholder``, ``call_module:foo``."""
    if node.op == "call_function":
        t = node.target
        if is_op_overload(t):
            return f"{t.namespace}.{op_schema(t).name.split('::')[-1]}"
        if is_op_packet(t):
            return f"{packet_name(t).replace('::', '.')}"
        return getattr(t, "__name__", str(t))
    if node.op in ("call_module", "call_method"):
        return f"{node.op}:{node.target}"
    return node.op


def op_histogram(gm: torch.fx.GraphModule) -> collections.Counter:
    """How often each operation occurs (only computing nodes: no placeholders, attributes, output)."""
    return collections.Counter(
        op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")
    )


_TORCH_DIR = os.path.dirname(torch.__file__)


def source_location(node: torch.fx.Node) -> str | None:
    """``file:line`` of the code that produced ``node``: the innermost frame of its recorded stack
    trace outside PyTorch itself (the model's own code, e.g. a transformers modeling file)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = []
    for line in trace.strip().splitlines():
        line = line.strip()
        if line.startswith('File "'):
            try:
                frames.append((line.split('"')[1], line.split("line ")[1].split(",")[0]))
            except IndexError:
                continue
    if not frames:
        return None
    outside = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    path, lineno = (outside or frames)[-1]
    return f"{path}:{lineno}"


def describe(node: torch.fx.Node) -> str:
    """One line naming a node for error messages: ``%linear_3 (aten.linear) at model.py:42``."""
    where = source_location(node)
    text = f"%{node.name} ({op_name(node)})"
    return f"{text} at {where}" if where else text


def get_attr_value(gm: torch.fx.GraphModule, node: torch.fx.Node):
    target = node.target
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def add_constant(gm: torch.fx.GraphModule, value: torch.Tensor, prefix: str) -> str:
    """Register ``value`` as a buffer on ``gm`` under a fresh name; return the name."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, value, persistent=True)
    return name


def walk_args(args) -> Iterator[torch.fx.Node]:
    """Every Node inside a (nested) args structure."""
    if isinstance(args, torch.fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from walk_args(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from walk_args(a)


def insert_after(graph: torch.fx.Graph, node: torch.fx.Node):
    """Insertion point right after ``node`` that keeps successive insertions in program order.

    (``Graph.inserting_after`` puts each new node directly after ``node``, reversing a sequence.)
    """
    return graph.inserting_before(node.next)


def is_constant(node) -> bool:
    """True when ``node`` depends on no graph input: a parameter, buffer, or a computation on them."""
    if not isinstance(node, torch.fx.Node):
        return True
    seen: dict[torch.fx.Node, bool] = {}
    stack = [node]
    result = True
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = True
        if n.op == "get_attr":
            continue
        if n.op != "call_function":
            result = False
            break
        stack.extend(walk_args((n.args, n.kwargs)))
    return result


def infer_meta(node: torch.fx.Node) -> None:
    """Fill ``node.meta["val"]`` by running its op on its inputs' FakeTensors (no real compute)."""
    if node.op != "call_function":
        return
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    vals = [v for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, float):
        return f"{a:g}"
    return repr(a)


def format_graph(gm: torch.fx.GraphModule) -> str:
    """A compact, stable listing of the graph: one line per node, with its shape.

    ``%conv2d = aten.conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)  # f32[1, 96, 1, 16]``
    """
    lines = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        note = ""
        if isinstance(v, torch.Tensor):
            note = f"  # {str(v.dtype).replace('torch.float', 'f').replace('torch.', '')}{list(v.shape)}"
        if n.op == "placeholder":
            lines.append(f"%{n.name} = input{note}")
        elif n.op == "get_attr":
            lines.append(f"%{n.name} = self.{n.target}{note}")
        elif n.op == "output":
            lines.append(f"return {_fmt_arg(n.args[0])}")
        else:
            args = [_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()]
            lines.append(f"%{n.name} = {op_name(n)}({', '.join(args)}){note}")
    return "\n".join(lines) + "\n"


def tensor_str(t) -> str:
    """``float32[1, 128, 768]`` for a tensor, the type name otherwise."""
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
    return type(t).__name__


_PROVENANCE_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack")
ORIGIN = "anefx_origin"


def origin(node: torch.fx.Node) -> str:
    """The name of the node a rewrite made ``node`` for (recorded by :func:`provenance`), or its own
    name: node names of the captured graph survive every pass, so this maps a rewritten node back
    to the captured node it replaces."""
    return node.meta.get(ORIGIN, node.name)


_provenance: contextvars.ContextVar[dict | None] = contextvars.ContextVar("anefx_provenance", default=None)


@contextlib.contextmanager
def provenance(node: torch.fx.Node):
    """Nodes created by :func:`call` inside this block inherit ``node``'s source location, so
    reports and converters can still point at the user's line after a rewrite, and its origin
    (:func:`origin`: the node of the captured graph they were made for)."""
    meta = {k: node.meta[k] for k in _PROVENANCE_KEYS if k in node.meta}
    meta[ORIGIN] = origin(node)
    token = _provenance.set(meta)
    try:
        yield
    finally:
        _provenance.reset(token)


def call(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """``graph.call_function`` that also records provenance; the new node's shape metadata is
    computed lazily, when a pass first asks for it (:func:`val`), and refreshed after the pass."""
    node = graph.call_function(target, tuple(args), dict(kwargs or {}))
    inherited = _provenance.get()
    if inherited:
        node.meta.update(inherited)
    return node


def eval_constant(gm: torch.fx.GraphModule, node, _memo: dict | None = None):
    """The value of a node that depends on no input (see :func:`is_constant`), computed now."""
    memo = {} if _memo is None else _memo
    if not isinstance(node, torch.fx.Node):
        return node
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        value = get_attr_value(gm, node)
    elif node.op == "call_function":
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: eval_constant(gm, n, memo))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    else:
        raise ValueError(f"{describe(node)} depends on a graph input")
    memo[node] = value
    return value


_KEEP = {"aten::_assert_async", "aten::_assert_scalar", "aten::_assert_tensor_metadata", "aten::sym_constrain_range"}


def _removable(node: torch.fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    t = node.target
    if is_op_overload(t):
        schema = op_schema(t)
        if schema.name in _KEEP:
            return False
        # mutating ops have side effects; ops merely tagged random (dropout, sdpa) are fine to drop
        return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return t is operator.getitem or not node.is_impure()


def dce(graph: torch.fx.Graph) -> int:
    """``Graph.eliminate_dead_code`` that also drops unused ``dropout``/``scaled_dot_product_attention``
    (torch keeps them because they are tagged nondeterministic) and keeps anefx's checks. Returns how
    many nodes went."""
    before = len(graph.nodes)
    graph.eliminate_dead_code(is_impure_node=lambda node: not _removable(node))
    return before - len(graph.nodes)


#: ``model.layers.3.mlp…``, ``encoder.layer.3.…``, ``h.3.…``, ``blocks.3.…``: a numbered layer.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The layer index in a parameter name ending with ``.`` (``"model.layers.3.mlp.weight."`` → 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_path(name: str) -> str | None:
    """The numbered layer a parameter name ending with ``.`` is in, as its path
    (``"model.decoder.layers.3.fc1.weight."`` → ``"model.decoder.layers.3"``: an encoder's layer 3
    is another layer)."""
    m = _LAYER.search(name)
    return name[: m.end(1)].lstrip(".") if m else None
