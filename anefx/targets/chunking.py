"""Split a compiled model at layer boundaries into consecutive packages under a size cap.

Exports over about 1 GB (iOS) or 2 GB (macOS) fail or fall off the Neural Engine, so large models
ship as a chain of ``.mlpackage`` files (Anemll's ``--chunk``, ml-stable-diffusion's
``--chunk-unet``). anefx does it for any model it compiles:

1. the validated graph is exported once (ATen, weights as inputs of the program);
2. every node gets a *stage*: the layer index of the parameters it reads (``layers.<i>.``), or
   the largest stage among its inputs — so stages never decrease along the data flow, the
   embedding belongs to the first layer's side and the final norm and LM head to the last. A model
   without ``layers.<i>`` parameters (a diffusers UNet: ``down_blocks.<i>``, ``mid_block``,
   ``up_blocks.<i>``) is staged by blocks (:func:`block_of`) in the order the graph first reads
   them; skip connections then cross boundaries like any other value;
3. consecutive stages are packed greedily into chunks whose weight bytes stay under the cap;
   input-independent values (weights, their views, folded tables) are copied into every chunk that
   reads them (a tied embedding ships with the first and the last chunk), everything else that
   crosses a boundary — hidden states, masks — becomes an output of one chunk and an input of the
   next;
4. each chunk is converted on its own, and the chain is validated in PyTorch against the model.

``manifest.json`` says how to chain them: each chunk's inputs (from the model or from which chunk)
and outputs, and where each model output comes from. States (``compile_lm``'s KV cache) are
buffers read and written by one layer's nodes, so they fall into that layer's chunk; the manifest
has a ``states`` list per chunk for them.

An impossible cap (one layer's weights alone above it) is refused from the model's parameters,
before capture or conversion starts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.ir.errors import AnefxError
from anefx.ir.graph import layer_of

MB = 1_000_000


def default_cap_mb(minimum_deployment_target: str) -> float:
    """1,024 MB for iOS-family targets, 2,048 MB for macOS (the sizes above which exports fail or
    leave the ANE, as users report them; see the module docstring)."""
    return 2048.0 if minimum_deployment_target.startswith("macOS") else 1024.0


def block_of(name: str) -> str:
    """A parameter's block when the model has no ``layers.<i>``: its name up to the first numbered
    part (``down_blocks.1.resnets.0.conv1.weight`` → ``down_blocks.1``), else its first part
    (``mid_block``, ``conv_out``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def check_cap(named_parameters: Iterable[tuple[str, torch.Tensor]], cap_mb: float, bytes_per_weight: float) -> None:
    """Refuse a cap that one layer (or one tensor outside the layers, or one block of a model without
    layers) cannot fit under."""
    if cap_mb <= 0:
        raise AnefxError(f"max_chunk_mb must be positive, got {cap_mb}")
    named_parameters = list(named_parameters)
    by_block = not any(layer_of(name + ".") is not None for name, _ in named_parameters)
    per_layer: dict[Any, float] = {}
    seen: set[int] = set()
    for name, p in named_parameters:
        if id(p) in seen:
            continue
        seen.add(id(p))
        layer = block_of(name) if by_block else layer_of(name + ".")
        key = ("layer", layer) if layer is not None else ("tensor", name)
        per_layer[key] = per_layer.get(key, 0.0) + p.numel() * bytes_per_weight
    if not per_layer:
        return
    (kind, which), size = max(per_layer.items(), key=lambda kv: kv[1])
    if size > cap_mb * MB:
        what = f"layer {which}" if kind == "layer" else f"the tensor {which}"
        raise AnefxError(
            f"max_chunk_mb={cap_mb:g} is impossible: {what} alone holds {size / MB:.1f} MB of weights "
            f"({bytes_per_weight:g} bytes per weight), and anefx splits only between layers; raise "
            f"max_chunk_mb to at least {math.ceil(size / MB * 10) / 10:g}, or compress the weights "
            "(compression='lut4'/'lut6')"
        )


# ---------------------------------------------------------------------------------------------
# Partition of an exported program
# ---------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    index: int
    stages: list[int]
    graph_module: torch.fx.GraphModule  # runs in torch: inputs in ``inputs`` order → ``outputs``
    inputs: list[str]  # value names (FX node names; model inputs keep the model's names)
    outputs: list[str]
    weight_bytes: int  # fp16 bytes of the weights this chunk holds (estimate before conversion)
    example_inputs: list[torch.Tensor] = field(default_factory=list)
    artifact: Any = None
    compression: Any = None
    #: the chunk module's weight attributes → the parameter names they hold in the program
    param_names: dict[str, str] = field(default_factory=dict)


@dataclass
class Chunked:
    """The chain: chunks in order, the model's inputs and where each model output comes from."""

    chunks: list[Chunk]
    model_inputs: list[str]
    model_outputs: list[str]  # value names, in the model's output order
    output_names: list[str]  # the model's output names (``logits`` …)
    cap_mb: float

    def run(self, inputs: Sequence[torch.Tensor], variant: str | None = None) -> list[torch.Tensor]:
        """Run the chain in PyTorch (``variant``: ``"fp16"``/``"compressed"`` weights when compressed)."""
        env = dict(zip(self.model_inputs, inputs, strict=True))
        with torch.no_grad():
            for c in self.chunks:
                args = [env[n] for n in c.inputs]
                if variant is not None and c.compression is not None:
                    outs = c.compression.swap.swap(args, c.compression.overrides(variant))[0]
                else:
                    outs = c.graph_module(*args)
                env.update(zip(c.outputs, outs, strict=True))
        return [env[n] for n in self.model_outputs]

    def manifest(self, stem: str) -> dict:
        producer = {n: "model" for n in self.model_inputs}
        chunks = []
        for c in self.chunks:
            chunks.append(
                {
                    "file": f"{stem}_chunk{c.index}.mlpackage",
                    "layers": [s for s in c.stages if s >= 0],
                    "inputs": [_describe(n, producer[n], t) for n, t in zip(c.inputs, c.example_inputs, strict=True)],
                    "outputs": list(c.outputs),
                    "states": [],
                    "weight_bytes_estimate": c.weight_bytes,
                }
            )
            producer.update({n: f"chunk{c.index}" for n in c.outputs})
        return {
            "format": "anefx-chunks/1",
            "max_chunk_mb": self.cap_mb,
            "model_inputs": list(self.model_inputs),
            "model_outputs": [
                {"name": name, "value": v, "from": producer[v]}
                for name, v in zip(self.output_names, self.model_outputs, strict=True)
            ],
            "chunks": chunks,
        }

    def save(self, path) -> Path:
        """Write ``<path>/`` with one ``<stem>_chunk<i>.mlpackage`` per chunk and ``manifest.json``;
        all or nothing (staged in a temporary folder, renamed at the end)."""
        return save_chunk_folder(path, self.manifest, [(c.index, c.artifact) for c in self.chunks], self.cap_mb)


def save_chunk_folder(path, manifest, packages: Sequence[tuple[int, Any]], cap_mb: float) -> Path:
    """``<path>/`` holding ``packages`` (``(chunk index, artifact)``, saved under the manifest's file
    names) and ``manifest.json``; all or nothing (staged next to ``path``, renamed at the end). Each
    package's weight files are checked against ``cap_mb``. ``manifest(stem)`` builds the manifest."""
    from anefx.targets.base import write_atomically

    path = Path(path)
    if path.suffix == ".mlpackage":  # ``-o model.mlpackage`` on a chunked compile: the folder ``model``
        path = path.with_suffix("")

    def write(staged: Path) -> None:
        staged.mkdir()
        data = manifest(path.name)
        for (index, artifact), entry in zip(packages, data["chunks"], strict=True):
            artifact.save(staged / entry["file"])
            size = package_weight_bytes(staged / entry["file"])
            entry["weight_bytes"] = size
            if size > cap_mb * MB:
                raise AnefxError(
                    f"chunk {index} came out at {size / MB:.3g} MB, above max_chunk_mb={cap_mb:g} "
                    "(the converter stored more than the weights anefx counted); lower the cap"
                )
        (staged / "manifest.json").write_text(json.dumps(data, indent=2))

    return write_atomically(path, write)


def _describe(name: str, source: str, t: torch.Tensor) -> dict:
    return {"name": name, "from": source, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def package_weight_bytes(package: Path) -> int:
    """Bytes of the weight files of a saved ``.mlpackage`` (``Data/com.apple.CoreML/weights``)."""
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0


def _is_weight_input(kind) -> bool:
    from torch.export.graph_signature import InputKind

    return kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def export_program(handoff):
    """The validated graph as the converters see it: legalized, exported, decomposed (once)."""
    from anefx.targets.base import legalized_clone

    gm = legalized_clone(handoff)
    ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
    return ep.run_decompositions({})


def split(
    ep,
    inputs: Sequence[torch.Tensor],
    output_names: Sequence[str],
    cap_mb: float,
    bytes_per_weight=2.0,
    input_stages: dict[str, int] | None = None,
):
    """Partition the exported program ``ep`` into chunks of at most ``cap_mb`` MB of weights.

    ``input_stages`` gives user inputs a stage (``compile_lm``: layer ``i``'s KV states belong to
    layer ``i``, so they are read and written in that layer's chunk); other inputs have none."""
    input_stages = input_stages or {}
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    values: dict[str, torch.Tensor] = {}  # weight placeholder → tensor
    param_name: dict[str, str] = {}
    for spec in sig.input_specs:
        if _is_weight_input(spec.kind):
            t = ep.state_dict.get(spec.target) if spec.kind != InputKind.CONSTANT_TENSOR else None
            values[spec.arg.name] = t if t is not None else ep.constants[spec.target]
            param_name[spec.arg.name] = spec.target
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    model_outputs = [outs[i].name for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.USER_OUTPUT]
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        raise AnefxError("chunking a program that mutates buffers is not supported yet (compile_lm states)")

    const: set[str] = set()
    stage: dict[str, int] = {}
    weight_stage = _weight_stages(ep, param_name)
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in values:
                const.add(n.name)
                stage[n.name] = weight_stage[n.name]
            else:
                stage[n.name] = input_stages.get(n.name, -1)
        elif n.op == "call_function":
            ins = n.all_input_nodes
            if all(i.name in const for i in ins):  # no input at all (``arange``, ``full``) is constant too
                const.add(n.name)
            stage[n.name] = max((stage[i.name] for i in ins), default=-1)
    # values computed from the model's (unstaged) inputs and small tables only — masks, positions,
    # rotary tables — are recomputed in every chunk that reads them (each chunk takes those inputs):
    # passing them between packages would make many boundary values, some equal (which coremltools
    # merges into one output under two names)
    derived: set[str] = set()
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user_inputs and n.name not in input_stages:
            derived.add(n.name)
        elif n.op == "call_function" and n.name not in const and n.name not in model_outputs:
            ins = n.all_input_nodes
            small = all(values[w].numel() <= _SMALL for w in _const_roots(n, const, values))
            if small and any(i.name in derived for i in ins) and all(i.name in derived or i.name in const for i in ins):
                derived.add(n.name)
    derived -= set(user_inputs)
    const_or_derived = const | derived
    # weights per stage: each weight placeholder counts in every stage whose nodes read it
    users_stage: dict[str, set[int]] = {w: set() for w in values}
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.name not in const:
            for w in _const_roots(n, const, values):
                users_stage[w].add(stage[n.name])
    stages = sorted({stage[n.name] for n in ep.graph.nodes if n.op == "call_function" and n.name not in const})

    def size(group: set[int]) -> int:
        return int(sum(values[w].numel() * bytes_per_weight for w, ss in users_stage.items() if ss & group))

    groups: list[list[int]] = []
    for s in stages:
        if groups and size(set(groups[-1]) | {s}) <= cap_mb * MB:
            groups[-1].append(s)
        else:
            if size({s}) > cap_mb * MB:
                raise AnefxError(
                    f"max_chunk_mb={cap_mb:g} is impossible: stage {s} (layer {s}) alone holds "
                    f"{size({s}) / MB:.1f} MB of weights; raise the cap or compress the weights"
                )
            groups.append([s])
    chunk_of_stage = {s: i for i, g in enumerate(groups) for s in g}
    chunk_of = {
        n.name: chunk_of_stage.get(stage[n.name], 0)
        for n in ep.graph.nodes
        if n.op in ("placeholder", "call_function") and n.name not in const
    }
    for name in user_inputs:
        chunk_of[name] = -1  # the model's inputs come from outside every chunk
    _place_boundaries(ep, chunk_of, len(groups), const_or_derived, values, set(model_outputs))

    chunks = []
    nodes = list(ep.graph.nodes)
    for ci, g in enumerate(groups):
        members = [
            n for n in nodes if n.op == "call_function" and n.name not in const_or_derived and chunk_of[n.name] == ci
        ]
        member_names = {n.name for n in members}
        needed: list[str] = []
        for n in members:
            for i in n.all_input_nodes:
                _need(i, derived, const | member_names, needed)
        later_users = set()
        for n in members:
            if n.name in model_outputs or any(
                u.op == "call_function" and u.name not in const_or_derived and chunk_of[u.name] > ci for u in n.users
            ):
                later_users.add(n.name)
        outputs = [n.name for n in members if n.name in later_users]
        gm = _build(ep, members, needed, outputs, const, values)
        names = {f"w_{w}": param_name[w] for w in values if hasattr(gm, f"w_{w}")}
        chunks.append(Chunk(ci, g, gm, needed, outputs, size(set(g)), param_names=names))
    chunked = Chunked(chunks, user_inputs, model_outputs, list(output_names), cap_mb)
    # example inputs of each chunk: run the chain once
    env = dict(zip(user_inputs, inputs, strict=True))
    with torch.no_grad():
        for c in chunks:
            c.example_inputs = [env[n].contiguous() for n in c.inputs]  # Core ML wants dense inputs
            env.update(zip(c.outputs, c.graph_module(*c.example_inputs), strict=True))
    return chunked


def _weight_stages(ep, param_name: dict[str, str]) -> dict[str, int]:
    """Each weight placeholder's stage: its layer index (-1 outside the layers), or, when no weight
    has one, the rank of its block (:func:`block_of`) in the order the graph first reads the blocks."""
    layers = {w: layer_of(p + ".") for w, p in param_name.items()}
    if any(v is not None for v in layers.values()):
        return {w: -1 if v is None else v for w, v in layers.items()}
    order: dict[str, int] = {}
    for n in ep.graph.nodes:
        for i in n.all_input_nodes if n.op == "call_function" else ():
            if i.name in param_name:
                order.setdefault(block_of(param_name[i.name]), len(order))
    return {w: order.get(block_of(p), -1) for w, p in param_name.items()}


def _place_boundaries(ep, chunk_of: dict[str, int], n_chunks: int, free: set[str], values: dict, outputs: set[str]):
    """Move the ops that read no weight across chunk boundaries so that the fewest bytes cross.

    The stage rule puts an op that reads no weight with its latest input (as early as possible), but
    such an op may as well run in any later chunk up to its first consumer's: RMSNorm's ``cat(x, -x)``
    at the end of a chunk would cross as a second, twice-as-wide value beside ``x``. Each boundary is
    a minimum s-t cut (``networkx.minimum_cut``) over the movable ops: a value costs its bytes when
    it is computed before the boundary and read after it, and no op may run before an op it reads.
    ``chunk_of`` is updated in place."""
    import networkx as nx

    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.name not in free]
    pinned = {n.name for n in nodes if any(i.name in values for i in n.all_input_nodes)} | outputs
    users = {n.name: [u.name for u in n.users if u.name in chunk_of and u.name not in free] for n in nodes}
    early = {n.name: chunk_of[n.name] for n in nodes}  # earliest chunk each op may run in
    late = dict(early)  # latest: its first consumer's, for an op that reads no weight
    for n in reversed(nodes):
        if n.name not in pinned and users[n.name]:
            late[n.name] = max(early[n.name], min(late[u] for u in users[n.name]))
    for b in range(n_chunks - 1):  # the boundary between chunk b and chunk b + 1
        movable = {n.name for n in nodes if early[n.name] <= b < late[n.name]}
        if not movable:
            continue
        g = nx.DiGraph()
        near = set(movable)
        for n in nodes:
            if n.name in movable:
                near |= {i.name for i in n.all_input_nodes if i.name in early} | set(users[n.name])
        for name in near:
            if name not in movable:  # fixed on one side of this boundary
                g.add_edge(*(("s", name) if late[name] <= b else (name, "t")), capacity=float("inf"))
        for n in nodes:
            if n.name not in near:
                continue
            val = n.meta.get("val")
            # only a tensor can cross (a ``split``'s list stays with the getitems that read it)
            nbytes = val.numel() * val.element_size() if isinstance(val, torch.Tensor) else float("inf")
            g.add_edge(n.name, ("out", n.name), capacity=float(nbytes))
            for u in users[n.name]:
                if u in near:
                    g.add_edge(("out", n.name), u, capacity=float("inf"))  # read after the boundary: it crosses
                    g.add_edge(u, n.name, capacity=float("inf"))  # a consumer never runs before its producer
        if "s" not in g or "t" not in g:
            continue
        _, (before, _after) = nx.minimum_cut(g, "s", "t")
        for name in movable:
            if name in before:
                late[name] = b
            else:
                early[name] = b + 1
    for name, c in early.items():
        chunk_of[name] = c


def check_chain(chunked: Chunked, ep, inputs: Sequence[torch.Tensor], what: str = "") -> None:
    """Raise ``ConversionError`` unless the chain of chunks, run in torch on ``inputs``, computes
    every output of the whole program ``ep`` (to fp32 rounding). ``what`` prefixes the message."""
    from anefx.ir.errors import ConversionError
    from anefx.targets.quality import WeightSwap

    got = chunked.run(inputs)
    want = WeightSwap(ep).swap(list(inputs), {})[0]
    for name, a, b in zip(chunked.output_names, got, want, strict=True):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise ConversionError(f"{what}the chained chunks differ from the whole graph on output {name!r}")


def convert_chunked(handoff, flat_inputs, target, compression, cap_mb: float, progress, timings: dict) -> Chunked:
    """Split the hand-off's graph at layer boundaries under ``cap_mb``, check the chain in torch
    against the whole graph, then convert (and compress) each chunk with ``target``."""
    from anefx.targets.base import HandOff
    from anefx.targets.compression import bytes_per_weight, compress_artifact

    t0 = time.perf_counter()
    ep = export_program(handoff)
    flat = list(flat_inputs)
    chunked = split(ep, flat, handoff.output_names, cap_mb, bytes_per_weight(compression))
    check_chain(chunked, ep, flat)
    timings["split"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in chunked.chunks:
        if progress:
            progress(f"convert:{target.name}:chunk{c.index}")
        c.artifact = target.convert(HandOff(c.graph_module, tuple(c.example_inputs), {}, c.inputs, c.outputs))
        if compression is not None:
            c.artifact, c.compression = compress_artifact(c.artifact, compression, c.example_inputs, progress)
    timings["convert"] = time.perf_counter() - t0
    return chunked


def _need(node: torch.fx.Node, derived: set[str], inside: set[str], needed: list[str]) -> None:
    """Add what a chunk must receive to read ``node``: the node itself, or for a value it recomputes
    (``derived``) what that value reads."""
    if node.name in derived:
        for i in node.all_input_nodes:
            _need(i, derived, inside, needed)
    elif node.name not in inside and node.name not in needed:
        needed.append(node.name)


def _const_roots(n: torch.fx.Node, const: set[str], values: dict) -> set[str]:
    """The weight placeholders an op reads, through any input-independent views."""
    roots, stack = set(), [i for i in n.all_input_nodes if i.name in const]
    while stack:
        m = stack.pop()
        if m.name in values:
            roots.add(m.name)
        stack.extend(i for i in m.all_input_nodes if i.name in const)
    return roots


#: Tables up to this many elements (rotary frequencies, position ranges) are copied into every chunk
#: that computes from the model's inputs with them.
_SMALL = 65536

_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _build(ep, members, needed, outputs, const, values) -> torch.fx.GraphModule:
    """A GraphModule of ``members``: ``needed`` become placeholders, weights get_attr (shared, no copy),
    input-independent nodes they read are copied in."""
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    root: dict[str, Any] = {}
    for name in needed:
        env[name] = graph.placeholder(name)
        src = next(n for n in ep.graph.nodes if n.name == name)
        env[name].meta = dict(src.meta)

    def get(node: torch.fx.Node) -> torch.fx.Node:
        if node.name in env:
            return env[node.name]
        if node.name in values:
            attr = f"w_{node.name}"
            root[attr] = values[node.name]
            new = graph.get_attr(attr)
            new.meta = dict(node.meta)
        else:  # an input-independent node: copy it (and what it reads)
            for i in node.all_input_nodes:
                get(i)
            new = graph.node_copy(node, lambda m: env[m.name])
        env[node.name] = new
        return new

    for n in members:
        for i in n.all_input_nodes:
            get(i)
        env[n.name] = new = graph.node_copy(n, lambda m: env[m.name])
        if new.target in _VIEWS:  # a boundary input arrives dense, not with its producer's strides
            new.target = torch.ops.aten.reshape.default
    graph.output(tuple(env[o] for o in outputs))
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm
