"""What a target gets: the validated graph of one function, how to call it, and how it was validated.

A program (:class:`~anefx.targets.artifact.Program`) holds one :class:`HandOff` per function. Before
its converter, a target transforms a clone of each graph (legalization: ops respelled, constants
folded; re-export and decompositions); every such transformation is validated the way the passes
were, with the hand-off's validator (its input sets and reference outputs):
:func:`legalized_clone` drops a legalization step at a site where it changes a value, and
:func:`check_converter_input` refuses to convert a graph that computes something else. Both write
what they found into ``handoff.checks``, which the report shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from anefx.driver.validate import NUMERIC_MODES, Validator, apply_validated
from anefx.ir.capture import flatten_inputs
from anefx.ir.errors import ConversionError


@dataclass(frozen=True)
class StateSpec:
    """A state of a program (a KV cache …): read and written in place by its functions, kept by the
    runtime between calls. ``layer``: the numbered layer that reads and writes it (chunking keeps it
    in that layer's chunk)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layer: int | None = None

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)


@dataclass
class HandOff:
    """One function of a program as the target gets it.

    ``graph_module`` is the validated graph: a pure function of its flat inputs (``input_names``,
    states included) to its flat outputs (``output_names``). ``states_in`` maps an input to the
    state it reads, ``states_out`` an output to the state it writes: a target with states makes them
    one state each, read and updated in place. ``validator`` checked the pipeline (its input sets
    and reference outputs), so that every transformation the target makes before its converter is
    checked the same way. ``checks`` collects what the target verified: the legalization steps
    (with any excluded site) and the error of the graph handed to the converter.

    ``param_names`` (graph weight attribute → the user's parameter name) and ``param_prefix`` (a
    prefix of the graph's attribute names that the user's names lack, e.g. ``model.`` when the
    model was wrapped) let compression and its reports speak of the user's parameters."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    input_names: list[str]
    output_names: list[str]
    validator: Validator | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    states_in: dict[str, str] = field(default_factory=dict)
    states_out: dict[str, str] = field(default_factory=dict)
    param_names: dict[str, str] = field(default_factory=dict)
    param_prefix: str = ""

    @property
    def flat_inputs(self) -> list:
        return flatten_inputs(self.example_args, self.example_kwargs)

    @property
    def stateful(self) -> bool:
        return bool(self.states_in or self.states_out)

    @property
    def value_inputs(self) -> list[str]:
        return [n for n in self.input_names if n not in self.states_in]

    @property
    def value_outputs(self) -> list[str]:
        return [n for n in self.output_names if n not in self.states_out]

    def value_examples(self) -> list[torch.Tensor]:
        """The example inputs that are not states, in ``value_inputs`` order."""
        return [t for n, t in zip(self.input_names, self.flat_inputs, strict=True) if n not in self.states_in]

    def user_param_name(self, attribute: str) -> str:
        """The user's name of the parameter the graph holds as ``attribute``."""
        return self.param_names.get(attribute, attribute).removeprefix(self.param_prefix)


@dataclass
class ProgramSpec:
    """What a target converts into one package: functions sharing weights, and the states they read
    and write. ``metadata`` is written into the package; ``default`` names the function a runtime
    calls by default (the first one when empty)."""

    functions: dict[str, HandOff]
    states: dict[str, StateSpec] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    default: str = ""

    def __post_init__(self):
        if not self.default:
            self.default = next(iter(self.functions))

    @property
    def stateful(self) -> bool:
        return any(h.stateful for h in self.functions.values())


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


_VIEW_STRIDE = re.compile(r"\bview\b.*\bstride", re.IGNORECASE | re.DOTALL)


def is_view_stride_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.export`` refusing a view of a tensor whose (fake) strides do not
    allow it (``ValueError: Cannot view a tensor with shape … and strides …`` under fake tensors,
    ``RuntimeError: view size is not compatible with input tensor's size and stride`` in eager): the
    failure a legalization step that removes a ``clone`` can cause."""
    return isinstance(exc, (RuntimeError, ValueError)) and bool(_VIEW_STRIDE.search(str(exc)))


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
    if validator is None or validator.options.mode not in NUMERIC_MODES:
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
