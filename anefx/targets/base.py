"""The hand-off interface: a rewritten canonical graph in, a deployable artifact out.

A target is one small module: ``convert(handoff) -> Artifact``. The artifact can ``save(path)`` and
report an ``op_histogram()`` of the converted program, so tests and benchmarks compare structure
the same way for every target.
"""

from __future__ import annotations

import abc
import collections
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx

from anefx.driver.validate import Validator, apply_validated
from anefx.ir.errors import AnefxError, ConversionError


@dataclass
class HandOff:
    """What a target gets: the validated graph, how to call it, and the validator that checked the
    pipeline (its input sets and reference outputs), so that every transformation the target makes
    before its converter is checked the same way. ``checks`` collects what the target verified:
    the legalization steps (with any excluded site) and the error of the graph handed to the
    converter; ``compile`` puts it in the report."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    input_names: list[str]
    output_names: list[str]
    validator: Validator | None = None
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact(abc.ABC):
    """A converted model. ``model`` is the target library's object (``ct.models.MLModel`` …)."""

    model: Any
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    #: the graph handed to the converter (re-exported, decomposed), as validated; runs in torch
    converter_input: torch.fx.GraphModule | None = None

    suffix: ClassVar[str] = ""

    @abc.abstractmethod
    def op_histogram(self) -> collections.Counter:
        """How often each op occurs in the converted program."""

    @abc.abstractmethod
    def _write(self, path: Path) -> None:
        """Write the artifact to ``path`` (which does not exist yet)."""

    def save(self, path) -> Path:
        """Write to ``path`` atomically: nothing half-written is left behind on failure."""
        path = Path(path)
        if self.suffix and path.suffix != self.suffix:
            raise AnefxError(f"{type(self).__name__} must be saved with the {self.suffix} suffix, got {path.name!r}")
        return write_atomically(path, self._write)


def write_atomically(path: Path, write) -> Path:
    """``write(staged)`` into a private folder next to ``path``, then rename the result to ``path``
    (replacing what was there): on any failure nothing is left behind and ``path`` is untouched."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise AnefxError(f"cannot save to {path}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise AnefxError(f"cannot save to {path}: {parent} is not a directory")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".anefx-", dir=parent))
    except OSError as exc:
        raise AnefxError(f"cannot save to {path}: {parent} is not writable ({exc.strerror})") from exc
    try:
        staged = tmp / path.name
        write(staged)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        staged.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def legalized_clone(handoff: HandOff, reexport: bool = True) -> torch.fx.GraphModule:
    """A clone of the validated graph spelled the way converters accept (ops respelled, constants
    folded): each target legalizes for itself, and the compiled graph is never touched.

    Each legalization step is validated like a pass (:func:`anefx.driver.validate.apply_validated`): a
    rewrite that changes a value is dropped at its site, never shipped (``handoff.checks`` names
    it). Without a validator (``validate="off"``) the steps run unchecked, as the user asked.

    ``reexport``: the caller will trace the result again with ``torch.export`` (whose fake strides
    refuse some views eager runs), so the steps are also required to keep it exportable. A caller
    that lifts the graph into a program directly (:func:`anefx.targets.lift.lifted_program`) passes
    False and skips that trial export (a full trace: a fifth of DistilBERT's hand-off)."""
    from anefx.ir.graph import clone_graph_module
    from anefx.passes.canonicalize import canonicalize
    from anefx.passes.fold_constants import fold_constants

    steps = {
        "canonicalize": lambda gm, site: (gm, any(canonicalize(gm, site).values()), {}),
        "fold_constants": lambda gm, site: (gm, bool(fold_constants(gm, site=site)), {}),
    }
    gm = handoff.graph_module
    validator = handoff.validator
    if has_mutations(gm):
        gm = _functionalized(handoff, validator)
    if validator is None or validator.options.mode == "off":
        gm = clone_graph_module(gm)
        for step in steps.values():
            step(gm, lambda node: True)
        gm.recompile()
        return gm
    legalized = _legalize(handoff, gm, steps, validator)
    if reexport and not _exports(handoff, legalized):  # e.g. a removed clone leaves a view of a non-contiguous tensor
        legalized = _legalize(handoff, gm, steps, _ExportingValidator(validator, handoff))
    return legalized


class _ExportingValidator:
    """A validator that also requires the graph to re-export (for legalization steps whose result
    runs in eager but not under ``torch.export``'s fake strides)."""

    def __init__(self, validator: Validator, handoff: HandOff):
        self.validator, self.handoff, self.options = validator, handoff, validator.options
        self.input_sets = validator.input_sets

    def check(self, gm: torch.fx.GraphModule):
        verdict = self.validator.check(gm)
        if verdict.ok and not _exports(self.handoff, gm):
            verdict.ok, verdict.message = False, "the legalized graph does not re-export"
        return verdict


def _exports(handoff: HandOff, gm: torch.fx.GraphModule) -> bool:
    try:
        torch.export.export(gm, handoff.example_args, handoff.example_kwargs, strict=False)
    except Exception:
        return False
    return True


def _legalize(handoff: HandOff, gm: torch.fx.GraphModule, steps: dict, validator) -> torch.fx.GraphModule:
    from anefx.ir.graph import clone_graph_module

    legalization = handoff.checks["legalization"] = {}
    for name, step in steps.items():
        applied = apply_validated(step, gm, validator.input_sets[0], validator)
        excluded = [f"{site}: {error}" for site, error in applied.excluded]
        if applied.graph_module is None:
            legalization[name] = {"status": "dropped", "error": applied.verdict.message, "excluded": excluded}
            continue
        legalization[name] = {"status": "changed" if applied.modified else "no change", "excluded": excluded}
        gm = applied.graph_module
    if gm is handoff.graph_module:
        gm = clone_graph_module(gm)  # the compiled graph is never touched
    gm.recompile()
    return gm


def has_mutations(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph writes a tensor in place (``add_``, ``copy_`` into a view …)."""
    from anefx.analysis.legalize import mutated_nodes

    return bool(mutated_nodes(gm.graph))


def _functionalized(handoff: HandOff, validator: Validator | None) -> torch.fx.GraphModule:
    """The graph with its in-place writes made functional (``torch.export`` + decompositions), so
    that constant folding can evaluate index tables a model builds in place (BEiT's relative
    position index) instead of leaving int scatters to the converter. Kept only when it validates."""
    try:
        ep = torch.export.export(handoff.graph_module, handoff.example_args, handoff.example_kwargs, strict=False)
        gm = ep.run_decompositions({}).module()
        for node in gm.graph.nodes:  # decomposed reshapes are views of whatever strides eager had:
            if node.target == torch.ops.aten.view.default:  # spell them reshape (same values) so
                node.target = torch.ops.aten.reshape.default  # the converter's export accepts them
        gm.recompile()
    except Exception as exc:  # the converter's own export will say what is wrong
        handoff.checks["functionalize"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return handoff.graph_module
    if validator is not None and validator.options.mode != "off":
        verdict = validator.check(gm, require_meta=False)
        if not verdict.ok:
            handoff.checks["functionalize"] = f"dropped: {verdict.message}"
            return handoff.graph_module
    if not _exports(handoff, gm):
        handoff.checks["functionalize"] = "dropped: the functional graph does not re-export"
        return handoff.graph_module
    handoff.checks["functionalize"] = "in-place writes made functional"
    return gm


def check_converter_input(handoff: HandOff, converter_input: torch.fx.GraphModule) -> None:
    """Validate the graph the converter gets (after re-export and decompositions, which are whole
    graph transformations with no site to drop) against the model; raise ``ConversionError``
    rather than convert a graph that computes something else. Its error goes to ``handoff.checks``."""
    validator = handoff.validator
    if validator is None or validator.options.mode != "numeric":
        handoff.checks["converter_input"] = "not validated (validation is off)"
        return
    verdict = validator.check(converter_input, require_meta=False)
    handoff.checks["converter_input"] = {
        "max_abs_error": verdict.max_abs_error,
        "max_rel_error": verdict.max_rel_error,
        "input_sets": len(validator.input_sets),
    }
    if not verdict.ok:
        raise ConversionError(
            f"the graph handed to the converter (re-exported and decomposed) differs from the model: "
            f"{verdict.message}. Nothing was converted; report this with the dump from ANEFX_DUMP_DIR"
        )


class Target(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @abc.abstractmethod
    def convert(self, handoff: HandOff) -> Artifact:
        """Convert the validated graph; raise ``ConversionError`` naming the op and source line."""
