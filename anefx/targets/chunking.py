"""Split a program at layer boundaries into a chain of packages under a size cap.

Exports over about 1 GB (iOS) or 2 GB (macOS) fail or fall off the Neural Engine, so large models
ship as a chain of packages (Anemll's ``--chunk``, ml-stable-diffusion's ``--chunk-unet``). anefx
does it for any program it compiles, whichever front end made it (:func:`split_artifact`):

1. each function's validated graph is exported once (ATen, weights as inputs of the program);
2. every node gets a *stage*: the layer index of the parameters it reads (``layers.<i>.``; a
   program may number its stages otherwise, ``Program.stage_of``: an encoder-decoder numbers its
   decoder layers after its encoder's), or the largest stage among its inputs — so stages never
   decrease along the data flow, the embedding belongs to the first layer's side and the final norm
   and LM head to the last; a state (``compile_lm``'s KV cache) has its layer's stage
   (``StateSpec.layer``), so each chunk reads and writes the states of its own layers only. A model
   without ``layers.<i>`` parameters (a diffusers UNet: ``down_blocks.<i>``, ``mid_block``,
   ``up_blocks.<i>``) is staged by blocks (:func:`block_of`) in the order the graph first reads
   them; skip connections then cross boundaries like any other value;
3. consecutive stages are packed greedily into chunks whose weight bytes stay under the cap, once
   for all the functions (a weight counted once whichever function reads it), never across a stage
   in ``Program.stage_breaks`` (an encoder-decoder's encoder is a chunk of its own, as WhisperKit
   ships Whisper's, whose only function is ``encode``);
   input-independent values (weights, their views, folded tables) are copied into every chunk that
   reads them (a tied embedding ships with the first and the last chunk); values computed from the
   model's inputs alone (masks, positions, rotary tables) are recomputed in every chunk that reads
   them; everything else that crosses a boundary (the hidden state) becomes an output of one chunk
   and an input of the next, each boundary a minimum cut;
4. every function splits into those stage groups (a chunk holds the functions that compute
   something there), each chain is checked in PyTorch against the whole graph, and each chunk
   becomes a :class:`~anefx.targets.artifact.Program` with its functions and states, converted and
   validated like any program; a state read or written in two chunks is refused.

The artifact's ``manifest.json`` says how to chain the packages
(:meth:`~anefx.targets.artifact.Artifact.manifest`). An impossible cap (one layer's weights alone
above it) is refused from the model's parameters, before capture or conversion starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from anefx.driver.validate import NUMERIC_MODES, Validator, run_flat
from anefx.ir.errors import AnefxError, ConversionError
from anefx.ir.graph import layer_of, layer_path
from anefx.targets.artifact import MB, Artifact, Program
from anefx.targets.handoff import HandOff, is_view_stride_failure, legalized_clone


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
    by_block = not any(layer_path(name + ".") is not None for name, _ in named_parameters)
    per_layer: dict[Any, float] = {}
    seen: set[int] = set()
    for name, p in named_parameters:
        if id(p) in seen:
            continue
        seen.add(id(p))
        # a layer of its stack (an encoder's layer 0 is not its decoder's), or a block without layers
        layer = block_of(name) if by_block else layer_path(name + ".")
        key = ("layer", layer) if layer is not None else ("tensor", name)
        per_layer[key] = per_layer.get(key, 0.0) + p.numel() * bytes_per_weight
    if not per_layer:
        return
    (kind, which), size = max(per_layer.items(), key=lambda kv: kv[1])
    if size > cap_mb * MB:
        index = layer_of(which + ".") if kind == "layer" else None
        if kind != "layer":
            what = f"the tensor {which}"
        else:  # a layer of a stack (its index and path), or a block of a model without layers
            what = f"layer {which}" if index is None else f"layer {index} ({which})"
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
class Part:
    """One chunk of one function's exported program."""

    index: int
    stages: list[int]
    graph_module: torch.fx.GraphModule  # runs in torch: inputs in ``inputs`` order → ``outputs``
    inputs: list[str]  # value names (model inputs keep the model's names)
    outputs: list[str]
    weight_bytes: int  # fp16 bytes of the weights this chunk holds (estimate before conversion)
    example_inputs: list[torch.Tensor] = field(default_factory=list)
    #: the chunk module's weight attributes → the parameter names they hold in the program
    param_names: dict[str, str] = field(default_factory=dict)
    #: computes nothing of its function (a function with no stage in this chunk's group)
    empty: bool = False


@dataclass
class Partition:
    """One function's program as a chain of parts: the program's user inputs and the value behind
    each of its outputs."""

    parts: list[Part]
    model_inputs: list[str]
    model_outputs: list[str]  # value names, in the program's output order
    #: ``(inputs, outputs)``: what the chain computed while :func:`split` made each part's examples
    #: (:func:`check_chain` reads it for the same inputs, then drops it)
    example_outputs: tuple[list, list] | None = None

    def carry(self, inputs: Sequence) -> tuple[list[list], list]:
        """The chain run on the program's ``inputs``: each part's inputs (dense: Core ML takes dense
        inputs; the program's own tensors where a part reads them, never written:
        :func:`~anefx.driver.validate.run_flat`) and the program's outputs."""
        env = dict(zip(self.model_inputs, inputs, strict=True))
        per_part = []
        for c in self.parts:
            args = [env[n].contiguous() if isinstance(env[n], torch.Tensor) else env[n] for n in c.inputs]
            env.update(zip(c.outputs, run_flat(c.graph_module, args), strict=True))
            per_part.append(args)
        return per_part, [env[n] for n in self.model_outputs]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.carry(inputs)[1]


def _is_weight_input(kind) -> bool:
    from torch.export.graph_signature import InputKind

    return kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def export_program(handoff):
    """The validated graph as the converters see it: legalized, exported, decomposed (once). The
    legalization's trial export (a whole ``torch.export``: a minute for Whisper-large-v3's encoder)
    runs only when the legalized graph does not export as it is."""
    gm = legalized_clone(handoff, reexport=False)
    try:
        ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
    except (RuntimeError, ValueError) as exc:
        if not is_view_stride_failure(exc):  # anything else is not the legalization's doing: it surfaces
            raise
        # a legalization step left a view torch.export's fake strides refuse (a removed clone): the
        # steps again, each required to keep the graph exportable (dropped where it does not)
        handoff.checks["export_retry"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        gm = legalized_clone(handoff)
        ep = torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
    return ep.run_decompositions({})


@dataclass
class Staging:
    """Every node of an exported program with its stage (see the module docstring)."""

    stage: dict[str, int]
    const: set[str]
    values: dict[str, torch.Tensor]  #: weight placeholder → tensor
    param_name: dict[str, str]  #: weight placeholder → the program's parameter name
    users_stage: dict[str, set[int]]  #: weight placeholder → the stages whose nodes read it
    user_inputs: list[str]
    model_outputs: list[str]

    def weights_by_stage(self, bytes_per_weight: float) -> dict[str, tuple[int, set[int]]]:
        """Parameter name → (fp16 bytes, the stages that read it)."""
        out: dict[str, tuple[int, set[int]]] = {}
        for w, ss in self.users_stage.items():
            name = self.param_name[w]
            size = int(self.values[w].numel() * bytes_per_weight)
            out[name] = (size, out.get(name, (0, set()))[1] | ss)
        return out


def default_stage(param: str) -> int | None:
    """A parameter's layer index (``layers.<i>.``), or None outside the layers."""
    return layer_of(param + ".")


def staging(
    ep,
    input_stages: dict[str, int] | None = None,
    output_stages: dict[str, int] | None = None,
    stage_of: Callable[[str], int | None] = default_stage,
) -> Staging:
    """Each node's stage: the stage of the parameters it reads (``stage_of`` a parameter name, by
    default its layer index), or the largest among its inputs. ``input_stages``: user inputs with a
    stage (states); ``output_stages``: outputs that belong to a stage at least (a state written
    there). Nodes reading no stage at all (an embedding before the first layer) take the program's
    first stage."""
    from torch.export.graph_signature import InputKind, OutputKind

    input_stages, output_stages = input_stages or {}, output_stages or {}
    sig = ep.graph_signature
    values: dict[str, torch.Tensor] = {}
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
    weight_stage = _weight_stages(ep, param_name, stage_of)
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
            stage[n.name] = max([stage[i.name] for i in ins] + [output_stages.get(n.name, -1)])
    staged = [v for k, v in stage.items() if v >= 0 and k not in const]
    first = min(staged, default=0)
    for n in ep.graph.nodes:  # what reads no stage yet (embeddings, their tables) belongs to the first
        if n.op == "call_function" and n.name not in const and stage[n.name] < 0:
            stage[n.name] = first
    users_stage: dict[str, set[int]] = {w: set() for w in values}
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.name not in const:
            for w in _const_roots(n, const, values):
                users_stage[w].add(stage[n.name])
    return Staging(stage, const, values, param_name, users_stage, user_inputs, model_outputs)


def pack(
    weights: dict[str, tuple[int, set[int]]], stages: Sequence[int], cap_mb: float, breaks: Sequence[int] = ()
) -> list[list[int]]:
    """Consecutive ``stages`` packed greedily into groups whose weights (each counted once, by
    parameter name: ``weights`` gives its bytes and the stages that read it) stay under ``cap_mb``;
    a group never runs across a stage in ``breaks`` (where one layer stack ends and another begins)."""

    def size(group: set[int]) -> int:
        return sum(b for b, ss in weights.values() if ss & group)

    groups: list[list[int]] = []
    for s in sorted(stages):
        if groups and s not in breaks and size(set(groups[-1]) | {s}) <= cap_mb * MB:
            groups[-1].append(s)
            continue
        if size({s}) > cap_mb * MB:
            raise AnefxError(
                f"max_chunk_mb={cap_mb:g} is impossible: stage {s} (layer {s}) alone holds "
                f"{size({s}) / MB:.1f} MB of weights; raise the cap or compress the weights"
            )
        groups.append([s])
    return groups


def split(
    ep,
    inputs: Sequence[torch.Tensor],
    cap_mb: float,
    bytes_per_weight=2.0,
    input_stages: dict[str, int] | None = None,
    public: dict[str, str] | None = None,
    *,
    output_stages: dict[str, int] | None = None,
    stage_of: Callable[[str], int | None] = default_stage,
    groups: list[list[int]] | None = None,
) -> Partition:
    """Partition the exported program ``ep`` into chunks of at most ``cap_mb`` MB of weights.

    ``input_stages`` gives user inputs a stage (``compile_lm``: layer ``i``'s KV states belong to
    layer ``i``, so they are read and written in that layer's chunk); other inputs have none;
    ``output_stages`` does the same for outputs (a state an encoder-decoder's ``encode`` writes).
    ``public`` renames values where they cross a boundary (the program's inputs and outputs keep
    the names the caller knows them by); every other value keeps its node's name. ``groups``: the
    stage groups of the chunks, when several functions of a program must split alike (default:
    packed from this program's weights); a function may have no stage in some groups (its part
    there computes nothing)."""
    public = public or {}
    st = staging(ep, input_stages, output_stages, stage_of)
    const, stage, values, param_name = st.const, st.stage, st.values, st.param_name
    user_inputs, model_outputs = st.user_inputs, st.model_outputs
    # values computed from the model's (unstaged) inputs and small tables only — masks, positions,
    # rotary tables — are recomputed in every chunk that reads them (each chunk takes those inputs):
    # passing them between packages would make many boundary values, some equal (which coremltools
    # merges into one output under two names)
    input_stages = input_stages or {}
    output_stages = output_stages or {}
    derived: set[str] = set()
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user_inputs and n.name not in input_stages:
            derived.add(n.name)
        elif n.op == "call_function" and n.name not in const and n.name not in output_stages:  # a state stays
            ins = n.all_input_nodes
            roots = _const_roots(n, const, values)  # tables: small, and no layer's weights
            small = all(values[w].numel() <= _SMALL and stage[w] < 0 for w in roots)
            if small and any(i.name in derived for i in ins) and all(i.name in derived or i.name in const for i in ins):
                derived.add(n.name)
    derived -= set(user_inputs)
    const_or_derived = const | derived
    stages = sorted({stage[n.name] for n in ep.graph.nodes if n.op == "call_function" and n.name not in const})
    weights = st.weights_by_stage(bytes_per_weight)
    if groups is None:
        groups = pack(weights, stages, cap_mb)
    chunk_of_stage = {s: i for i, g in enumerate(groups) for s in g}
    missing = [s for s in stages if s not in chunk_of_stage]
    if missing:
        raise ConversionError(f"stages {missing} are in none of the chunks' groups {groups}")
    chunk_of = {
        n.name: chunk_of_stage[stage[n.name]]
        for n in ep.graph.nodes
        if n.op in ("placeholder", "call_function") and n.name not in const and stage[n.name] in chunk_of_stage
    }
    for name in user_inputs:
        chunk_of[name] = -1  # the model's inputs come from outside every chunk
    _place_boundaries(ep, chunk_of, len(groups), const_or_derived, values, set(model_outputs))

    chunks: list[Part] = []
    nodes = list(ep.graph.nodes)
    # outputs no chunk computes (an input-independent value, or one recomputed from the inputs: an
    # encoder-decoder's encoder_length): the last chunk makes them, and so does a part that would
    # otherwise only write states (a Core ML function needs an output: encode in a decoder chunk
    # before the last writes its layers' cross-attention states and passes nothing on)
    unmade = [name for name in model_outputs if name in const_or_derived and name not in output_stages]
    # ... and a state written with such a value (Whisper's encoder mask) is written in its stage's chunk
    unmade_states = {
        name: chunk_of_stage.get(output_stages[name], len(groups) - 1)
        for name in model_outputs
        if name in const_or_derived and name in output_stages
    }
    by_name = {n.name: n for n in nodes}
    plans = []  # per chunk: (members, needed, outputs)
    for ci in range(len(groups)):
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
        made = [name for name, c in unmade_states.items() if c == ci]
        if ci == len(groups) - 1 or (members and all(o in output_stages for o in outputs)):
            made += unmade
        outputs += made
        for name in made:
            _need(by_name[name], derived, const | member_names, needed)
        plans.append((members, needed, outputs))
    # a staged input (a state) read by chunks after its own (Whisper's encoder mask: every decoder
    # layer's cross-attention reads it): its chunk reads it and passes it on as a boundary value
    # (a state lives in one chunk); read before its chunk, it cannot be passed
    owner = {name: chunk_of_stage.get(s) for name, s in input_stages.items() if name in user_inputs}
    relayed: dict[str, str] = {}  # staged input -> the boundary value's name
    for ci, (_, needed, _) in enumerate(plans):
        for name in needed:
            o = owner.get(name)
            if o is None or o == ci:
                continue
            if o > ci:
                raise ConversionError(
                    f"the state input {public.get(name, name)!r} (stage {input_stages[name]}, chunk {o}) is read "
                    f"in the earlier chunk {ci}: a state must live in one chunk"
                )
            relayed.setdefault(name, f"{public.get(name, name)}_from_chunk{o}")
    for name, _boundary in relayed.items():
        _, needed, outputs = plans[owner[name]]
        if name not in needed:
            needed.append(name)
        outputs.append(name)
    for ci, ((members, needed, outputs), g) in enumerate(zip(plans, groups, strict=True)):
        inside = {n: relayed[n] for n in needed if n in relayed and owner[n] != ci}
        gm = _build(ep, members, needed, outputs, const, values, public | inside)
        names = {f"w_{w}": param_name[w] for w in values if hasattr(gm, f"w_{w}")}
        ins = [inside.get(n, public.get(n, n)) for n in needed]
        outs = [relayed[n] if n in relayed and owner[n] == ci else public.get(n, n) for n in outputs]
        size = int(sum(b for b, ss in weights.values() if ss & set(g)))
        chunks.append(Part(ci, g, gm, ins, outs, size, param_names=names, empty=not members))
    partition = Partition(chunks, [public.get(n, n) for n in user_inputs], [public.get(n, n) for n in model_outputs])
    # example inputs of each chunk: run the chain once
    per_part, outputs = partition.carry(inputs)
    for c, args in zip(chunks, per_part, strict=True):
        c.example_inputs = args
    partition.example_outputs = (list(inputs), outputs)
    return partition


def _weight_stages(
    ep, param_name: dict[str, str], stage_of: Callable[[str], int | None] = default_stage
) -> dict[str, int]:
    """Each weight placeholder's stage: ``stage_of`` its parameter name (by default its layer index;
    -1 outside the layers), or, when no weight has one, the rank of its block (:func:`block_of`) in
    the order the graph first reads the blocks."""
    layers = {w: stage_of(p) for w, p in param_name.items()}
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


def check_chain(partition: Partition, ep, inputs: Sequence[torch.Tensor], names: Sequence[str], what: str = "") -> None:
    """Raise ``ConversionError`` unless the chain of parts, run in torch on ``inputs``, computes every
    output of the whole program ``ep`` (to fp32 rounding). ``what`` prefixes the message."""
    from anefx.targets.quality import WeightSwap

    known, partition.example_outputs = partition.example_outputs, None
    same = known is not None and len(known[0]) == len(inputs) and all(a is b for a, b in zip(known[0], inputs))
    got = known[1] if same else partition.run(inputs)
    want = WeightSwap(ep).swap(list(inputs), {})[0]
    for name, a, b in zip(names, got, want, strict=True):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise ConversionError(f"{what}the chained chunks differ from the whole graph on output {name!r}")


def chain_sets(partition: Partition, input_sets: Sequence[Sequence]) -> list[list[list]]:
    """Per part of ``partition``: its input sets, the example's first (its ``example_inputs``, which
    :func:`split` carried through the chain), then the whole function's other ``input_sets`` (flat, in
    the partition's ``model_inputs`` order) carried through the chain in torch
    (:meth:`Partition.carry`). A part's inputs are the function's own tensors (model inputs and
    states, shared, never written) and the values earlier parts computed; what no later part reads
    (new states, the function's outputs) is dropped."""
    per_part: list[list[list]] = [[c.example_inputs] for c in partition.parts]
    for flat in input_sets:
        for ins, args in zip(per_part, partition.carry(flat)[0], strict=True):
            ins.append(args)
    return per_part


def split_artifact(artifact: Artifact, cap_mb: float, bytes_per_weight: float = 2.0) -> Artifact:
    """The artifact's (single, unconverted) program split into a chain of programs of at most
    ``cap_mb`` MB of weights each, every function into the same stage groups (packed once from the
    weights of all of them, never across ``program.stage_breaks``), each function's chain checked in
    torch against its whole graph. A chunk holds the functions that compute something there (an
    encoder-decoder's encoder chunks hold only ``encode``) and the states they read or write; a
    state lives in one chunk."""
    (program,) = artifact.programs
    from torch.export.graph_signature import InputKind

    several = len(program.functions) > 1
    stage_of = program.stage_of or default_stage
    exported, flats, stagings, io = {}, {}, {}, {}
    sets: dict[str, tuple[list[str], list[list], bool]] = {}
    chained: dict[str, list[list[list]]] = {}
    for fn, h in program.functions.items():
        ep = export_program(h)
        user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        outs = [n.name for n in next(n for n in ep.graph.nodes if n.op == "output").args[0]]
        if len(user) != len(h.input_names) or len(outs) != len(h.output_names):
            raise ConversionError(f"the exported {fn} program has inputs {user}; expected {h.input_names}")
        public = dict(zip(user, h.input_names, strict=True)) | dict(zip(outs, h.output_names, strict=True))
        in_stages, out_stages = {}, {}
        for node, name in zip(user, h.input_names, strict=True):
            state = h.states_in.get(name)
            if state is not None and program.states[state].layer is not None:
                in_stages[node] = program.states[state].layer
        for node, name in zip(outs, h.output_names, strict=True):
            state = h.states_out.get(name)
            if state is not None and program.states[state].layer is not None:
                out_stages[node] = program.states[state].layer
        exported[fn], flats[fn], io[fn] = ep, h.flat_inputs, (public, in_stages, out_stages)
        stagings[fn] = staging(ep, in_stages, out_stages, stage_of)
        if h.validator is not None:
            # each chunk gets a validator of its own: the function's input sets carried through the
            # chain (below), so the chunks share the function's inputs and states and each value
            # crossing a boundary is held once, as the next chunk's input (no set is drawn per chunk:
            # Whisper-large-v3's random caches are ~0.6 GB per set; no reference but the example's
            # is held: each is computed from the chunk's graph when a check reads it).
            # The whole graph's references are not read again: dropped now.
            sets[fn] = (list(h.validator.set_names), list(h.validator.input_sets), bool(h.validator.masks))
            h.validator.keep_example_only()
    weights: dict[str, tuple[int, set[int]]] = {}
    stages: set[int] = set()
    for st in stagings.values():
        for name, (size, ss) in st.weights_by_stage(bytes_per_weight).items():
            weights[name] = (size, weights.get(name, (0, set()))[1] | ss)
        stages |= {v for k, v in st.stage.items() if k not in st.const and v >= 0}
    groups = pack(weights, sorted(stages), cap_mb, program.stage_breaks)
    partitions: dict[str, Partition] = {}
    for fn, h in program.functions.items():
        public, in_stages, out_stages = io[fn]
        partitions[fn] = split(
            exported[fn],
            flats[fn],
            cap_mb,
            bytes_per_weight,
            in_stages,
            public,
            output_stages=out_stages,
            stage_of=stage_of,
            groups=groups,
        )
        check_chain(partitions[fn], exported[fn], flats[fn], h.output_names, f"{fn}: " if several else "")
        if fn in sets and h.validator.options.mode in NUMERIC_MODES:
            _, inputs, _ = sets[fn]
            chained[fn] = chain_sets(partitions[fn], inputs[1:])  # the example's: split carried it
    programs = []
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        functions = {}
        for fn, h in program.functions.items():
            c = partitions[fn].parts[i]
            if c.empty and not c.outputs:
                continue
            states_in = {name: h.states_in[name] for name in c.inputs if name in h.states_in}
            states_out = {name: h.states_out[name] for name in c.outputs if name in h.states_out}
            validator = None
            if fn in chained:  # each chunk is validated against its own graph on its function's sets
                names, _, masked = sets[fn]
                ins = chained[fn][i]
                c.example_inputs = ins[0]
                # its references on the sets after the example are computed when the checks read them
                validator = Validator(
                    c.graph_module, ins[0], h.validator.options, given=(names, ins, None), masked=masked
                )
            elif h.validator is not None:  # no numeric check: the chunk's lint
                validator = Validator(c.graph_module, c.example_inputs, h.validator.options)
            if all(name in h.states_out for name in c.outputs):
                raise ConversionError(
                    f"{fn} chunk {i} (stages {group}) only writes states {c.outputs}: a Core ML function needs an "
                    "output; report this model with its max_chunk_mb"
                )
            functions[fn] = HandOff(
                c.graph_module,
                tuple(c.example_inputs),
                {},
                c.inputs,
                c.outputs,
                validator,
                states_in=states_in,
                states_out=states_out,
                param_names={attr: h.user_param_name(target) for attr, target in c.param_names.items()},
            )
        held = {s for f in functions.values() for s in (*f.states_in.values(), *f.states_out.values())}
        for s in held:
            if owner.setdefault(s, i) != i:
                using = [fn for fn, f in functions.items() if s in (*f.states_in.values(), *f.states_out.values())]
                raise ConversionError(
                    f"the state {s!r} is read or written in chunks {owner[s]} and {i} ({', '.join(using)} in chunk "
                    f"{i}): a state must live in one chunk (give it the layer of its stage: StateSpec.layer)"
                )
        layers = [s for s in group if s >= 0]
        states = {s: spec for s, spec in program.states.items() if s in held}
        metadata = {**program.metadata, "anefx.chunk": f"{i + 1}/{len(groups)}", "anefx.layers": json.dumps(layers)}
        if states:
            metadata["anefx.states"] = json.dumps({s: list(spec.shape) for s, spec in states.items()})
        weight = int(sum(b for b, ss in weights.values() if ss & set(group)))
        if not functions:
            parts = {fn: (p.parts[i].empty, p.parts[i].outputs) for fn, p in partitions.items()}
            raise ConversionError(f"chunk {i} (stages {group} of {groups}) holds no function: {parts}")
        default = program.default if program.default in functions else next(iter(functions))
        programs.append(
            Program(
                functions,
                states,
                metadata,
                default,
                i,
                layers,
                weight,
                stage_of=stage_of,
                stage_breaks=program.stage_breaks,
            )
        )
    return Artifact(programs, artifact.target, artifact.inputs, artifact.outputs, chunked=True, cap_mb=cap_mb)


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


def _strided(val) -> bool:
    """A tensor whose memory is not laid out in its dimension order (``dim_order``: size-1 dimensions
    count, which ``is_contiguous`` ignores): what Core ML refuses as a program input or output."""
    return isinstance(val, torch.Tensor) and val.dim_order() != tuple(range(val.dim()))


def _build(ep, members, needed, outputs, const, values, public: dict[str, str]) -> torch.fx.GraphModule:
    """A GraphModule of ``members``: ``needed`` become placeholders (named by ``public`` where it names
    them), weights get_attr (shared, no copy), input-independent nodes they read are copied in."""
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    root: dict[str, Any] = {}
    for name in needed:
        env[name] = graph.placeholder(public.get(name, name))
        if env[name].name != public.get(name, name):
            raise ConversionError(f"the chunk input {public.get(name, name)!r} clashes with a node's name")
        src = next(n for n in ep.graph.nodes if n.name == name)
        env[name].meta = dict(src.meta)
        if _strided(src.meta.get("val")):  # it arrives dense (a permute's output)
            env[name].meta["val"] = src.meta["val"].new_empty(src.meta["val"].shape)

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
    for o in outputs:  # an output no chunk computes is copied in (see ``split``)
        if o not in env:
            get(next(n for n in ep.graph.nodes if n.name == o))
    results = []
    for o in outputs:  # a boundary value leaves dense (Core ML has no strided outputs: a permute's)
        node, val = env[o], env[o].meta.get("val")
        if node.op == "placeholder" or _strided(val):  # an input passed on (a relayed state) leaves as a copy
            node = graph.call_function(
                torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format}
            )
            node.meta["val"] = val.new_empty(val.shape)
        results.append(node)
    graph.output(tuple(results))
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm
