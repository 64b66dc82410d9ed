"""One options object for every front end, and the one place they are checked and resolved.

:class:`CompileOptions` holds everything ``compile``, ``compile_lm`` (and the front ends to come)
share: the pipeline and its validation, the debug switches, the never-worse guard, the target and
its options, conversion, compression, the chunk cap and the LM head. A front end's keyword
arguments override its fields (:meth:`CompileOptions.with_overrides`); :func:`prepare` then checks
them all against the target's capabilities and the model's parameters *before any long work
starts* (a refused scheme, an impossible cap, a target without states) and resolves them into a
:class:`Plan`.

Precedence, the same for every front end: an explicit argument beats the options object, which
beats the environment (``ANEFX_VALIDATE``, the ``ANEFX_*`` debug variables). For the validation
mode: ``validate=`` > ``CompileOptions.validate`` > ``ValidationOptions.mode`` (when ``validation``
is given) > ``ANEFX_VALIDATE`` > the pipeline's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from anefx.driver.debug import DebugOptions, validate_mode_from_env
from anefx.driver.pipeline import Pipeline
from anefx.driver.validate import ValidationOptions
from anefx.ir.errors import AnefxError
from anefx.targets.base import Target
from anefx.targets.chunking import check_cap
from anefx.targets.compression import CompressionOptions, bytes_per_weight, resolve
from anefx.targets.lm_head import LMHeadOptions
from anefx.targets.registry import target_by_name
from anefx.targets.verify import ArtifactCheckOptions


@dataclass(frozen=True)
class CompileOptions:
    """How to compile, whatever the front end.

    pipeline: the passes (default :meth:`Pipeline.default`).
    validate: ``off``, ``lint``, ``example`` or ``numeric`` (:mod:`anefx.driver.validate`); validation:
        :class:`ValidationOptions` (tolerances, input sets …).
    debug: :class:`DebugOptions` (print-IR, dump dir, bisect limit); the ``ANEFX_*`` variables
        when not given.
    never_worse: keep the regions whose layout changes came out above the stock conversion's in
        their original form (:mod:`anefx.driver.guard`); False ships the passes' output as it is.
    target: ``"coreml"`` or ``"coreai"``; target_options: its options dataclass.
    convert: False stops after the passes (no hand-off).
    compression: ``"lut4" | "lut6" | "lut8" | "int8"`` or :class:`CompressionOptions`.
    max_chunk_mb: split into a chain of packages of at most this many MB of weights (default: the
        target's cap, applied only to models above it).
    lm_head: :class:`LMHeadOptions`: split projections to the vocabulary into convs the ANE holds
        (without options only heads above 65,536 channels) and optionally return argmax / top-k.
    artifact_check: execute the converted program on the validation's input sets and compare it
        with the model (:class:`ArtifactCheckOptions`, or its mode ``"all"``, ``"example"``,
        ``"off"``; default ``ANEFX_ARTIFACT_CHECK``, else ``"all"``).
    """

    pipeline: Pipeline | None = None
    validate: str | None = None
    validation: ValidationOptions | None = None
    debug: DebugOptions | None = None
    never_worse: bool = True
    target: str = "coreml"
    target_options: object | None = None
    convert: bool = True
    compression: str | CompressionOptions | None = None
    max_chunk_mb: float | None = None
    lm_head: LMHeadOptions | None = None
    artifact_check: ArtifactCheckOptions | str | None = None

    def with_overrides(self, **overrides) -> CompileOptions:
        """These options with every override that is not None applied (a front end's explicit
        keyword arguments)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown compile option(s) {unknown}")
        return dataclasses.replace(self, **given)


def compile_options(options: CompileOptions | None, caller: str, **given) -> CompileOptions:
    """``options`` with a front end's explicit keyword arguments applied (those not None): the
    fields of :class:`CompileOptions`, and the fields of :class:`DebugOptions` (``dump_dir=…``,
    applied on top of ``debug``, or of the ``ANEFX_*`` variables when ``debug`` is not given). Any
    other keyword is a ``TypeError`` naming ``caller``."""
    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    switches = {f.name for f in dataclasses.fields(DebugOptions)}
    unknown = sorted(set(given) - fields - switches)
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {unknown}; besides its own parameters it takes "
            f"the CompileOptions fields {sorted(fields)} and the DebugOptions fields {sorted(switches)}"
        )
    opts = (options or CompileOptions()).with_overrides(**{k: v for k, v in given.items() if k in fields})
    debug = {k: v for k, v in given.items() if k in switches and v is not None}
    if debug:
        opts = dataclasses.replace(opts, debug=(opts.debug or DebugOptions.from_env()).merged(**debug))
    return opts


@dataclass(frozen=True)
class Plan:
    """The options checked and resolved: what the stages run with."""

    options: CompileOptions
    target: Target
    pipeline: Pipeline  #: with its validation mode resolved
    debug: DebugOptions
    compression: CompressionOptions | None
    cap_mb: float | None  #: the chunk cap in MB, or None (no chunking)
    artifact_check: ArtifactCheckOptions = dataclasses.field(default_factory=ArtifactCheckOptions)

    @property
    def convert(self) -> bool:
        return self.options.convert

    @property
    def bytes_per_weight(self) -> float:
        return bytes_per_weight(self.compression)


def prepare(
    options: CompileOptions,
    named_parameters: Iterable[tuple[str, torch.Tensor]] = (),
    *,
    states: bool = False,
    functions: int = 1,
) -> Plan:
    """Check ``options`` against the target's capabilities and the model's parameters, and resolve
    them, before any long work starts. ``states`` / ``functions``: what the front end will build."""
    params = list(named_parameters)
    comp = resolve(options.compression)
    convert = options.convert
    if comp is not None and not convert:
        raise AnefxError("compression= compresses the converted program: it needs convert=True")
    if options.max_chunk_mb is not None and not convert:
        raise AnefxError("max_chunk_mb= splits the converted program into packages: it needs convert=True")
    if options.lm_head is not None:
        from anefx.targets.lm_head import check

        check(options.lm_head)
    target = target_by_name(options.target, options.target_options)  # bad options fail now
    target = target.for_program(states=states, functions=functions)
    if comp is not None:
        target = target.for_compression(comp, explicit_options=options.target_options is not None)
    cap = None
    if convert and target.capabilities.chunks:
        per_weight = bytes_per_weight(comp)
        if options.max_chunk_mb is not None:
            cap = float(options.max_chunk_mb)
        else:  # chunk only models above the target's default cap
            total = sum(p.numel() for p in {id(p): p for _, p in params}.values()) * per_weight
            default = target.default_cap_mb()
            cap = default if default is not None and total > default * 1e6 else None
        if cap is not None:
            check_cap(params, cap, per_weight)
    elif options.max_chunk_mb is not None:
        raise AnefxError(
            f"max_chunk_mb: the {target.name!r} target does not split programs into chunks (use target='coreml')"
        )
    pipeline = options.pipeline if options.pipeline is not None else Pipeline.default()
    if options.validation is not None:
        pipeline = pipeline.with_validation(options.validation)
    if options.validate is not None:
        mode = options.validate
    elif options.validation is not None:
        mode = options.validation.mode
    else:
        mode = validate_mode_from_env(pipeline.validation.mode)
    if mode not in ("off", "lint", "example", "numeric"):
        raise AnefxError(f"validate must be 'off', 'lint', 'example' or 'numeric', got {mode!r}")
    pipeline = pipeline.with_validation(mode=mode)
    debug = options.debug if options.debug is not None else DebugOptions.from_env()
    return Plan(options, target, pipeline, debug, comp, cap, artifact_check_options(options.artifact_check))


def artifact_check_options(given: ArtifactCheckOptions | str | None) -> ArtifactCheckOptions:
    """``artifact_check=`` resolved: the options, a mode name, or ``ANEFX_ARTIFACT_CHECK`` (default
    ``all``)."""
    import os

    if isinstance(given, ArtifactCheckOptions):
        return given
    mode = given if given is not None else os.environ.get("ANEFX_ARTIFACT_CHECK", "all")
    return ArtifactCheckOptions(mode=mode)
