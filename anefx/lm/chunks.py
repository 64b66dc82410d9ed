"""A compiled causal LM split at layer boundaries into consecutive stateful packages under a size cap.

Each function's validated step graph (``(input_ids, position_ids, *states) -> (logits, *states')``)
is exported once and partitioned by :func:`anefx.targets.chunking.split`, with layer ``i``'s KV states
given layer ``i``'s stage: a chunk reads and writes the states of its own layers only. The embedding
falls in the first chunk, the final norm and the LM head in the last; values that cross a boundary
(hidden states, masks and rotary tables derived from the positions) are outputs of one chunk and
inputs of the next. Both functions are split into the same layer groups (refused otherwise).

Each chunk becomes one ``.mlpackage`` holding ``prefill`` and ``decode`` (weights shared) with its
layers' states as Core ML states; ``manifest.json`` says how to chain them. The chain is validated in
PyTorch against the unsplit graph, and :class:`ChainRunner` runs it for ``CompiledLM.generate``.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.ir.errors import ConversionError
from anefx.lm.cache import CacheLayout
from anefx.lm.package import FUNCTIONS, INPUTS_DOC

MB = 1_000_000


@dataclass
class LMChunk:
    """One package of the chain: per function, its pure graph and the names it reads and writes."""

    index: int
    layers: list[int]
    graphs: dict[str, torch.fx.GraphModule] = field(repr=False)  #: inputs in ``inputs`` order
    inputs: dict[str, list[str]]  #: per function: every graph input (values and state placeholders)
    outputs: dict[str, list[str]]  #: per function: every graph output (values and new states)
    state_inputs: dict[str, dict[str, str]]  #: per function: graph input name → state name
    state_outputs: dict[str, dict[str, str]]  #: per function: graph output name → state name
    examples: dict[str, list[torch.Tensor]] = field(repr=False)
    weight_bytes_estimate: int = 0
    param_names: dict[str, str] = field(default_factory=dict)  #: chunk weight attribute → program parameter
    package: Any = None  #: the converted LMPackage (both functions, the chunk's states)
    compression: Any = None  #: per function ``Compressed`` when compressed

    @property
    def states(self) -> list[str]:
        return sorted(set(self.state_inputs["decode"].values()), key=_state_key)

    def value_inputs(self, fn: str) -> list[str]:
        return [n for n in self.inputs[fn] if n not in self.state_inputs[fn]]

    def value_outputs(self, fn: str) -> list[str]:
        return [n for n in self.outputs[fn] if n not in self.state_outputs[fn]]


def _state_key(name: str) -> tuple[int, int]:
    kind, _, index = name.rpartition("_")
    return (0 if kind.startswith("key") else 1, int(index))


@dataclass
class LMChunks:
    chunks: list[LMChunk]
    layout: CacheLayout
    cap_mb: float
    logits: dict[str, str]  #: per function: the value name of the logits

    def runner(self, fn: str, states: dict[str, torch.Tensor] | None = None) -> ChainRunner:
        return ChainRunner(self, fn, states)

    def op_histogram(self, fn: str) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for c in self.chunks:
            total += c.package.op_histogram(fn)
        return total

    def manifest(self, stem: str) -> dict:
        entries = []
        for c in self.chunks:
            functions = {}
            for fn in FUNCTIONS:
                functions[fn] = {
                    "inputs": [
                        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in zip(c.inputs[fn], c.examples[fn], strict=True)
                        if n not in c.state_inputs[fn]
                    ],
                    "outputs": ["logits" if n == self.logits[fn] else n for n in c.value_outputs(fn)],
                }
            entries.append(
                {
                    "file": f"{stem}_chunk{c.index}.mlpackage",
                    "layers": c.layers,
                    "states": {s: list(self.layout.states[s]) for s in c.states},
                    "functions": functions,
                    "weight_bytes_estimate": c.weight_bytes_estimate,
                }
            )
        return {
            "format": "anefx-lm-chunks/1",
            "how": "call the chunks in order with the same function (prefill or decode); each input named "
            "input_ids / position_ids comes from the caller, every other input is the output of the same "
            "name of an earlier chunk; each chunk keeps its own states (one Core ML state object per chunk)",
            "max_chunk_mb": self.cap_mb,
            "context_length": self.layout.context,
            "logits": f"output 'logits' of chunk{len(self.chunks) - 1}",
            "inputs": INPUTS_DOC,
            "chunks": entries,
        }

    def save(self, path) -> Path:
        """``<path>/`` with one ``<stem>_chunk<i>.mlpackage`` per chunk and ``manifest.json``; all or
        nothing (staged next to ``path``, renamed at the end). Each package's weight files are checked
        against the cap."""
        from anefx.targets.chunking import save_chunk_folder

        return save_chunk_folder(path, self.manifest, [(c.index, c.package) for c in self.chunks], self.cap_mb)


class ChainRunner:
    """``(input_ids, position_ids) -> logits`` through the chunks' graphs in PyTorch, each chunk with
    its own states (the same interface as :class:`~anefx.lm.stateful.Stateful`)."""

    def __init__(self, chunks: LMChunks, fn: str, shared: dict[str, torch.Tensor] | None = None):
        self.chunks, self.fn = chunks, fn
        self.states = shared if shared is not None else dict(zip(chunks.layout.state_names, chunks.layout.zeros()))

    def reset(self) -> None:
        for t in self.states.values():
            t.zero_()

    def __call__(self, input_ids, position_ids):
        fn = self.fn
        env = {"input_ids": input_ids, "position_ids": position_ids}
        with torch.no_grad():
            for c in self.chunks.chunks:
                args = [self.states[c.state_inputs[fn][n]] if n in c.state_inputs[fn] else env[n] for n in c.inputs[fn]]
                outs = c.graphs[fn](*args)
                for name, value in zip(c.outputs[fn], outs, strict=True):
                    if name in c.state_outputs[fn]:
                        self.states[c.state_outputs[fn][name]].copy_(value)
                    else:
                        env[name] = value
        return env[self.chunks.logits[fn]]


def split_lm(
    graphs: dict[str, torch.fx.GraphModule],
    layout: CacheLayout,
    examples: dict[str, list[torch.Tensor]],
    cap_mb: float,
    bytes_per_weight: float,
) -> LMChunks:
    """Partition both functions' graphs into the same layer groups, validated chained in torch."""
    from torch.export.graph_signature import InputKind

    from anefx.targets.base import HandOff
    from anefx.targets.chunking import check_chain, export_program, split

    names = layout.state_names
    n_layers = len(layout.layers)
    per_fn = {}
    for fn in FUNCTIONS:
        flat = list(examples[fn])
        handoff = HandOff(graphs[fn], tuple(flat), {}, ["input_ids", "position_ids", *names], ["logits", *names])
        ep = export_program(handoff)
        user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        if len(user) != 2 + len(names):
            raise ConversionError(f"the exported {fn} step has inputs {user}; expected ids, positions and the states")
        placeholders = dict(zip(user[2:], names, strict=True))
        stages = {p: i % n_layers for i, p in enumerate(user[2:])}
        chunked = split(ep, flat, ["logits", *names], cap_mb, bytes_per_weight, stages)
        check_chain(chunked, ep, flat, f"{fn}: ")
        per_fn[fn] = (chunked, placeholders)
    groups = {fn: [c.stages for c in per_fn[fn][0].chunks] for fn in FUNCTIONS}
    if groups["prefill"] != groups["decode"]:
        raise ConversionError(
            f"prefill and decode split into different layer groups ({groups}); report this model with its cap"
        )
    chunks = []
    for i, stages in enumerate(groups["decode"]):
        graphs_i, inputs, outputs, s_in, s_out, ex = {}, {}, {}, {}, {}, {}
        for fn in FUNCTIONS:
            chunked, placeholders = per_fn[fn]
            c = chunked.chunks[i]
            new_state_values = dict(zip(chunked.model_outputs[1:], names, strict=True))
            graphs_i[fn], inputs[fn], outputs[fn], ex[fn] = c.graph_module, c.inputs, c.outputs, c.example_inputs
            s_in[fn] = {n: placeholders[n] for n in c.inputs if n in placeholders}
            s_out[fn] = {n: new_state_values[n] for n in c.outputs if n in new_state_values}
            if sorted(s_in[fn].values()) != sorted(s_out[fn].values()):
                raise ConversionError(
                    f"{fn} chunk {i} reads the states {sorted(s_in[fn].values())} but writes "
                    f"{sorted(s_out[fn].values())}: a state must live in one chunk"
                )
        if sorted(s_in["prefill"].values()) != sorted(s_in["decode"].values()):
            raise ConversionError(f"chunk {i}: prefill and decode hold different states")
        layers = [s for s in stages if s >= 0]
        estimate = per_fn["decode"][0].chunks[i].weight_bytes
        params = {**per_fn["prefill"][0].chunks[i].param_names, **per_fn["decode"][0].chunks[i].param_names}
        chunks.append(LMChunk(i, layers, graphs_i, inputs, outputs, s_in, s_out, ex, estimate, params))
    logits = {fn: per_fn[fn][0].model_outputs[0] for fn in FUNCTIONS}
    return LMChunks(chunks, layout, cap_mb, logits)


def stateful_chunk(chunk: LMChunk, fn: str, layout: CacheLayout) -> torch.fx.GraphModule:
    """The chunk's ``fn`` graph with its states as buffers copied in place: inputs are the value inputs
    (named as the values), outputs the value outputs (what coremltools converts into a stateful program)."""
    root = torch.nn.Module()
    root.chunk = chunk.graphs[fn]
    graph = torch.fx.Graph()
    env = {}
    for name in chunk.inputs[fn]:
        if name in chunk.state_inputs[fn]:
            state = chunk.state_inputs[fn][name]
            root.register_buffer(state, torch.zeros(layout.states[state], dtype=layout.dtype))
            env[name] = graph.get_attr(state)
        else:
            env[name] = graph.placeholder(name)
    call = graph.call_module("chunk", tuple(env[n] for n in chunk.inputs[fn]))
    values = []
    for k, name in enumerate(chunk.outputs[fn]):
        item = graph.call_function(_getitem, (call, k))
        if name in chunk.state_outputs[fn]:
            buffer = graph.get_attr(chunk.state_outputs[fn][name])
            graph.call_method("copy_", (buffer, item))
        else:
            values.append(item)
    graph.output(tuple(values))
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


def _getitem(x, i):
    return x[i]


def convert_chunks(chunks: LMChunks, options, metadata: dict[str, str], progress=None, compression=None) -> None:
    """Convert (and compress) every chunk's two functions into one stateful package per chunk."""
    from anefx.lm.package import convert_stateful, merge

    say = progress or (lambda _s: None)
    cache = None
    if compression is not None:
        from anefx.targets.compression import SharedKMeans

        cache = SharedKMeans()  # the tied table in the first and last chunk gets the same tables
    for c in chunks.chunks:
        functions = {}
        for fn in FUNCTIONS:
            say(f"convert:chunk{c.index}:{fn}")
            wrapper = stateful_chunk(c, fn, chunks.layout)
            example = [t for n, t in zip(c.inputs[fn], c.examples[fn], strict=True) if n not in c.state_inputs[fn]]
            names = ["logits" if n == chunks.logits[fn] else n for n in c.value_outputs(fn)]
            functions[fn] = convert_stateful(
                f"chunk{c.index}:{fn}", wrapper, tuple(example), names, options, c.graphs[fn]
            )
        if compression is not None:
            from anefx.lm.compress import compress_functions

            examples = {
                fn: [t for n, t in zip(c.inputs[fn], c.examples[fn], strict=True) if n not in c.state_inputs[fn]]
                for fn in FUNCTIONS
            }

            def user_name(name: str, c=c) -> str:  # chunk.w_p_model_… → model.layers.0.… (the user's name)
                attr = name.removeprefix("chunk.")
                return c.param_names.get(attr, attr).removeprefix("model.")

            functions, c.compression = compress_functions(functions, compression, examples, say, cache, user_name)
        meta = {**metadata, "anefx.chunk": f"{c.index + 1}/{len(chunks.chunks)}", "anefx.layers": json.dumps(c.layers)}
        meta["anefx.states"] = json.dumps({s: list(chunks.layout.states[s]) for s in c.states})
        c.package = merge(functions, meta)
