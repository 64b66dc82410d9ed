"""The one artifact type: what a compile ships, whichever front end made it.

An :class:`Artifact` is a chain of :class:`Program` s: one for a single package, several when the
model was split under a size cap (:mod:`anefx.targets.chunking`). Each program holds its functions
(``main`` for ``compile``; ``prefill`` and ``decode`` for ``compile_lm``; ``encode`` … for the next
front ends), their validated graphs (:class:`~anefx.targets.handoff.HandOff`), the states they read
and write, and once converted its target's :class:`~anefx.targets.base.Package`.

Everything below works the same for every front end:

* :meth:`Artifact.call` / :meth:`Artifact.run` run a function through the chain in PyTorch (the
  validated graphs, or the converted programs with their fp16 or compressed weights: ``variant``),
  states carried in place; :meth:`Artifact.executor` gives the packages ready to run outside PyTorch
  with the target's executor (a :class:`~anefx.targets.executor.LoadedProgram`; a
  :class:`~anefx.targets.executor.ChainProgram` for a chain). Both run a chain with the one runner,
  :func:`~anefx.targets.executor.run_chain`;
* :meth:`Artifact.save` writes one package, or a folder with one package per chunk and
  ``manifest.json`` (:meth:`Artifact.manifest`, format ``anefx-chunks/2``); :meth:`Artifact.load`
  reads either back (packages only: it runs with the target's executor; ``anefx.load(folder)``);
* :meth:`Artifact.compressed` compresses every function of every package (one k-means shared by
  all, so a weight two functions hold is stored once), and :attr:`Artifact.compression` says how
  well (:class:`~anefx.targets.compression.Compression`);
* ``op_histogram`` / ``operations`` per function over the chain; the ANE report reads the same.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anefx.driver.events import Events, events_of
from anefx.driver.validate import run_flat
from anefx.ir.errors import AnefxError, ConversionError
from anefx.targets.base import Package, Target, write_atomically
from anefx.targets.compression import Compressed, Compression, CompressionOptions, SharedKMeans, compress_function
from anefx.targets.executor import ChainProgram, LoadedProgram, OnDemand, run_chain
from anefx.targets.handoff import ProgramSpec, StateSpec

MB = 1_000_000
MANIFEST_FORMAT = "anefx-chunks/2"


@dataclass
class Program(ProgramSpec):
    """One package's worth of an artifact: its functions' validated graphs and states, and (once
    converted) the target's package. In a chain, ``index`` is its place and ``layers`` the numbered
    layers it holds."""

    index: int = 0
    layers: list[int] = field(default_factory=list)
    #: fp16 bytes of the weights its graphs hold (the estimate chunking packs by)
    weight_bytes_estimate: int = 0
    package: Package | None = None
    #: the package before compression (what :meth:`Artifact.compressed` compresses again)
    fp16_package: Package | None = None
    #: chunking: a parameter's stage (default: its layer index), and the stages that start a layer
    #: stack no chunk runs across (an encoder-decoder numbers its decoder layers after its encoder's)
    stage_of: Callable[[str], int | None] | None = None
    stage_breaks: tuple[int, ...] = ()

    @property
    def converted(self) -> bool:
        return self.package is not None

    def value_inputs(self, function: str) -> list[str]:
        return self.functions[function].value_inputs

    def value_outputs(self, function: str) -> list[str]:
        return self.functions[function].value_outputs

    def call(
        self,
        function: str,
        values: Mapping[str, torch.Tensor],
        states: MutableMapping[str, torch.Tensor],
        compressed: Compressed | None = None,
        variant: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one function on ``values`` (by input name); its new states are copied into ``states``
        (by state name); returns its value outputs by name. ``variant`` (``"fp16"`` or
        ``"compressed"``) runs the converted program with that set of weights (``compressed``)
        instead of the validated graph."""
        h = self.functions[function]
        missing = [n for n in h.value_inputs if n not in values]
        if missing:
            raise AnefxError(f"{function} needs the inputs {missing}; got {sorted(values)}")
        if variant is None:
            args = [states[h.states_in[n]] if n in h.states_in else values[n] for n in h.input_names]
            outs = run_flat(h.graph_module, args)
            produced = dict(zip(h.output_names, outs, strict=True))
        else:
            if compressed is None:
                raise AnefxError(f"variant={variant!r} runs the compressed programs: this artifact is not compressed")
            buffers = {s: states[s] for s in set(h.states_in.values())}
            outs, new = compressed.swap.swap_stateful(
                [values[n] for n in h.value_inputs], compressed.overrides(variant), buffers
            )
            produced = dict(zip(h.value_outputs, outs, strict=True))
            produced |= {name: new[s] for name, s in h.states_out.items()}
        result = {}
        for name, value in produced.items():
            state = h.states_out.get(name)
            if state is None:
                result[name] = value
            else:
                states[state].copy_(value)
        return result


@dataclass
class Artifact:
    """A compiled model as it ships: a single program (``chunked`` False) or a chain of chunks, each
    with its functions and states. ``inputs`` / ``outputs``: per function, the names the caller
    gives and gets (the chain's wiring between chunks is each program's own input and output names:
    an input not given by the caller is the output of the same name of an earlier chunk)."""

    programs: list[Program]
    target: Target
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    chunked: bool = False
    cap_mb: float | None = None
    compression: Compression | None = None

    @classmethod
    def single(cls, program: Program, target: Target) -> Artifact:
        return cls(
            [program],
            target,
            {fn: h.value_inputs for fn, h in program.functions.items()},
            {fn: h.value_outputs for fn, h in program.functions.items()},
        )

    # -- what it holds -----------------------------------------------------------------------
    @property
    def chunks(self) -> list[Program]:
        """The programs of the chain, in order (one when unchunked)."""
        return self.programs

    @property
    def functions(self) -> list[str]:
        return list(self.inputs)

    @property
    def default(self) -> str:
        """The function a runtime calls by default: the last package's (every chunk holds it but an
        encoder-decoder's encoder chunks, whose only function ``encode`` is their own default)."""
        return self.programs[-1].default

    @property
    def states(self) -> dict[str, StateSpec]:
        """Every state of the chain (each lives in one program)."""
        return {name: spec for p in self.programs for name, spec in p.states.items()}

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.programs[0].metadata)

    @property
    def converted(self) -> bool:
        return all(p.converted for p in self.programs)

    @property
    def package(self) -> Package:
        """The single package (not for a chain: see :attr:`chunks`)."""
        self._need_converted()
        if self.chunked:
            raise AttributeError(f"this artifact is a chain of {len(self.programs)} packages: see .chunks")
        return self.programs[0].package

    def holding(self, function: str) -> list[Program]:
        """The programs of the chain that hold ``function``, in order (an encoder-decoder's encoder
        chunks hold only ``encode``, its decoder chunks no ``encode``)."""
        return [
            p
            for p in self.programs
            if function in p.functions or (p.package is not None and function in p.package.functions)
        ]

    def _need_converted(self) -> None:
        if not self.converted:
            raise AttributeError("compiled with convert=False: there is no converted program")

    def _function(self, function: str | None) -> str:
        function = function or self.default
        if function not in self.inputs:
            raise KeyError(f"no function {function!r}; this artifact has {self.functions}")
        return function

    def operations(self, function: str | None = None) -> list:
        """The converted ops of one function over the chain, in order."""
        self._need_converted()
        function = self._function(function)
        return [op for p in self.holding(function) for op in p.package.operations(function)]

    def op_histogram(self, function: str | None = None) -> collections.Counter:
        """Op types of one function of the converted program(s), summed over the chain."""
        self._need_converted()
        function = self._function(function)
        return sum((p.package.op_histogram(function) for p in self.holding(function)), collections.Counter())

    def weight_bytes(self) -> int:
        """Bytes of the weight files of every package (what :meth:`save` writes)."""
        self._need_converted()
        return sum(p.package.weight_bytes() for p in self.programs)

    # -- running -----------------------------------------------------------------------------
    def call(
        self,
        function: str,
        values: Mapping[str, torch.Tensor],
        states: MutableMapping[str, torch.Tensor] | None = None,
        variant: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run ``function`` through the chain in PyTorch: inputs and outputs by name, states (fresh
        zeros when not given) updated in place. ``variant``: see :meth:`Program.call`."""
        function = self._function(function)
        if states is None:
            states = {name: spec.zeros() for name, spec in self.states.items()}
        if not all(p.functions for p in self.programs):
            raise AnefxError(
                "this artifact was loaded from disk and has no PyTorch graphs: run it with runtime='target'"
            )

        def call(_i: int, program: Program, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            packages = self.compression.packages if self.compression is not None else None
            compressed = packages[program.index][function] if packages is not None else None
            return program.call(function, given, states, compressed, variant)

        with torch.no_grad():
            env = run_chain(self.holding(function), values, lambda program: program.value_inputs(function), call)
        return {name: env[name] for name in self.outputs[function]}

    def run(
        self,
        inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        function: str | None = None,
        states: MutableMapping[str, torch.Tensor] | None = None,
        variant: str | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`call` with inputs given in the function's input order (or by name) and outputs
        returned in its output order."""
        function = self._function(function)
        if not isinstance(inputs, Mapping):
            inputs = dict(zip(self.inputs[function], inputs, strict=True))
        return list(self.call(function, inputs, states, variant).values())

    def executor(self, runtime: str | None = None, *, one_part_at_a_time: bool = False) -> LoadedProgram:
        """The converted packages ready to run outside PyTorch with the target's executor
        (``runtime``: one that the target's ``capabilities.runtimes`` lists; default its
        ``executor``): the program ``save`` would write, as ``anefx.load`` returns it; a chain is a
        :class:`~anefx.targets.executor.ChainProgram` over one program per chunk.
        ``one_part_at_a_time``: a chain's packages are each loaded for its call and released after it
        (:class:`~anefx.targets.executor.OnDemand`): one chunk in memory at a time rather than all,
        for a load per chunk per call."""
        self._need_converted()
        if self.chunked and one_part_at_a_time:
            parts = [OnDemand(functools.partial(self.target.executor, p.package, runtime)) for p in self.programs]
        else:
            parts = [self.target.executor(p.package, runtime) for p in self.programs]
        if not self.chunked:
            return parts[0]
        return ChainProgram(parts, self.inputs, self.outputs, self.default)

    def fp16(self) -> Artifact:
        """This artifact with its packages before compression (itself when it is not compressed)."""
        if self.compression is None:
            return self
        programs = [dataclasses.replace(p, package=p.fp16_package or p.package) for p in self.programs]
        return dataclasses.replace(self, programs=programs, compression=None)

    # -- compression -------------------------------------------------------------------------
    def compressed(self, options: CompressionOptions, events: Events | None = None) -> Artifact:
        """This artifact with every function of every package compressed per ``options`` (from the
        fp16 packages: compressing a compressed artifact starts again from fp16), measured on each
        function's example inputs. One k-means is shared by all (:class:`SharedKMeans`), so a weight
        two functions or two chunks hold gets the same tables and is stored once per package; the
        functions of a package must come out with the same plan (else it would store both)."""
        self._need_converted()
        events = events_of(events)
        several = len(self.programs) > 1 or len(self.programs[0].functions) > 1
        cache = SharedKMeans() if several else None
        programs, packages = [], []
        with events.stage("compress", scheme=options.scheme):
            for program in self.programs:
                base = program.fp16_package or program.package
                order = [program.default, *(fn for fn in program.functions if fn != program.default)]
                done: dict[str, Compressed] = {}
                for fn in order:
                    events.step(f"chunk{program.index}.{fn}" if self.chunked else fn)
                    inputs = program.functions[fn].value_examples()
                    done[fn] = compress_function(base.functions[fn], options, inputs, cache, events)
                _same_plan(done)
                functions = {
                    fn: dataclasses.replace(base.functions[fn], model=done[fn].model) for fn in program.functions
                }
                metadata = {**program.metadata, "anefx.compression": options.scheme}
                spec = dataclasses.replace(program, metadata=metadata)
                package = self.target.package(functions, spec)
                programs.append(dataclasses.replace(spec, package=package, fp16_package=base))
                packages.append(done)  # the package's default first
        compression = Compression(options, packages, self.default, seconds=events.events[-1].seconds or 0.0)
        return dataclasses.replace(self, programs=programs, compression=compression)

    # -- on disk -----------------------------------------------------------------------------
    def manifest(self, stem: str) -> dict:
        """How to run the chain (format ``anefx-chunks/2``, the same for every front end)."""
        suffix = self.target.suffix
        producer: dict[str, str] = {}
        chunks = []
        for fn in self.functions:
            producer.update({(fn, n): "model" for n in self.inputs[fn]})
        for p in self.programs:
            functions = {}
            for fn, h in p.functions.items():
                examples = dict(zip(h.input_names, h.flat_inputs, strict=True))
                functions[fn] = {
                    "inputs": [
                        {"name": n, "from": producer[(fn, n)], **_describe(examples[n])} for n in h.value_inputs
                    ],
                    "outputs": list(h.value_outputs),
                }
                producer.update({(fn, n): f"chunk{p.index}" for n in h.value_outputs})
            chunks.append(
                {
                    "file": f"{stem}_chunk{p.index}{suffix}",
                    "layers": list(p.layers),
                    "states": {s: list(spec.shape) for s, spec in p.states.items()},
                    "functions": functions,
                    "weight_bytes_estimate": p.weight_bytes_estimate,
                }
            )
        return {
            "format": MANIFEST_FORMAT,
            "how": "call the chunks in order with the same function; an input whose 'from' is 'model' comes from "
            "the caller, any other is the output of the same name of that earlier chunk; each chunk keeps its "
            "own states (one state object per chunk)",
            "target": self.target.name,
            "max_chunk_mb": self.cap_mb,
            "default_function": self.default,
            "functions": {
                fn: {
                    "inputs": list(self.inputs[fn]),
                    "outputs": [{"name": n, "from": producer[(fn, n)]} for n in self.outputs[fn]],
                }
                for fn in self.functions
            },
            "metadata": {k: v for k, v in self.metadata.items() if k not in _PER_CHUNK},
            "chunks": chunks,
        }

    def save(self, path) -> Path:
        """Write the package, or for a chain ``<path>/`` with one ``<stem>_chunk<i>`` package per chunk
        and ``manifest.json`` (``-o model.mlpackage`` on a chain writes the folder ``model``). All or
        nothing; each chunk's weight files are checked against the cap."""
        self._need_converted()
        if not self.chunked:
            return self.programs[0].package.save(path)
        path = Path(path)
        if path.suffix == self.target.suffix:
            path = path.with_suffix("")

        def write(staged: Path) -> None:
            staged.mkdir()
            data = self.manifest(path.name)
            for program, entry in zip(self.programs, data["chunks"], strict=True):
                program.package.save(staged / entry["file"])
                size = program.package.weight_bytes_at(staged / entry["file"])
                entry["weight_bytes"] = size
                if self.cap_mb is not None and size > self.cap_mb * MB:
                    raise AnefxError(
                        f"chunk {program.index} came out at {size / MB:.3g} MB, above max_chunk_mb={self.cap_mb:g} "
                        "(the converter stored more than the weights anefx counted); lower the cap"
                    )
            (staged / "manifest.json").write_text(json.dumps(data, indent=2))

        return write_atomically(path, write)

    @classmethod
    def load(cls, path, target: Target | None = None) -> Artifact:
        """A saved package, or a chain's folder (its ``manifest.json``), read back: its packages and
        their wiring, without PyTorch graphs (it runs with the target's executor)."""
        from anefx.targets.registry import target_by_name

        path = Path(path)
        manifest = path / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            if data.get("format") != MANIFEST_FORMAT:
                raise AnefxError(f"{manifest} is format {data.get('format')!r}; this anefx reads {MANIFEST_FORMAT}")
            target = target or target_by_name(data["target"])
            programs = []
            for entry in data["chunks"]:
                package = target.load(path / entry["file"])
                states = {s: StateSpec(tuple(shape)) for s, shape in entry["states"].items()}
                default = data["default_function"] if data["default_function"] in package.functions else package.default
                programs.append(Program({}, states, package.metadata, default, len(programs), entry["layers"]))
                programs[-1].package = package
            inputs = {fn: f["inputs"] for fn, f in data["functions"].items()}
            outputs = {fn: [o["name"] for o in f["outputs"]] for fn, f in data["functions"].items()}
            return cls(programs, target, inputs, outputs, chunked=True, cap_mb=data.get("max_chunk_mb"))
        if target is None:
            from anefx.targets.registry import target_for_suffix

            target = target_for_suffix(path.suffix)
        package = target.load(path)
        program = Program({}, package.states(), package.metadata, package.default)
        program.package = package
        inputs = {fn: package.input_names(fn) for fn in package.functions}
        outputs = {fn: package.output_names(fn) for fn in package.functions}
        return cls([program], target, inputs, outputs)


#: Metadata keys a chunk's package has for itself (left out of the manifest's common metadata).
_PER_CHUNK = ("anefx.chunk", "anefx.layers", "anefx.states")


def _describe(t) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _same_plan(done: dict[str, Compressed]) -> None:
    """A weight that several functions of a package hold must get the same compression in each (else
    the package would store it twice); functions may hold different weights (an encoder-decoder's
    ``encode`` holds the encoder, its ``decode`` the decoder)."""
    schemes: dict[str, dict[str, str]] = {}
    for fn, c in done.items():
        for w in c.weights:
            if w.param:
                schemes.setdefault(w.param, {})[fn] = w.scheme
    differ = sorted((param, by_fn) for param, by_fn in schemes.items() if len(set(by_fn.values())) > 1)
    if differ:
        raise ConversionError(
            f"functions would ship different compressions of the same weights ({differ[:4]} …): the package "
            "would store both; report this model"
        )
