"""Validation: is the rewritten graph still the model?

Two levels, chosen with ``ValidationOptions.mode`` (or ``ANEFX_VALIDATE=off|lint|numeric``):

* ``lint``: ``torch.fx.Graph.lint()`` plus anefx's invariants (every node has shape metadata, the
  outputs keep their shapes and dtypes).
* ``numeric`` (default): lint, then run the graph on the example inputs and on seeded random inputs
  of the same shapes and dtypes, and compare every output with the reference (the graph as captured,
  before any pass) under a per-dtype tolerance. Errors never accumulate unseen: each pass is measured
  against the original, not against the pass before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from anefx.graph import describe, tensor_str

Mode = Literal["off", "lint", "numeric"]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise."""

    atol: float
    rtol: float


DEFAULT_TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-8, 1e-7),
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
}


@dataclass(frozen=True)
class ValidationOptions:
    """How the pipeline checks each pass."""

    mode: Mode = "numeric"
    #: Seeded random input sets besides the example inputs.
    random_inputs: int = 1
    seed: int = 0
    tolerances: Mapping[torch.dtype, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))

    def tolerance(self, dt: torch.dtype) -> Tolerance:
        return self.tolerances.get(dt, DEFAULT_TOLERANCES.get(dt, Tolerance(0.0, 0.0)))


@dataclass
class ValidationResult:
    ok: bool
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    message: str | None = None


def random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``t``'s shape and dtype whose values stay in the example's domain.

    Integers are drawn from ``[min, max]`` of the example (token ids stay valid indices), booleans
    keep the example's values where it has only one, floats follow the example's mean and spread.
    """
    if t.dtype == torch.bool:
        if t.numel() == 0 or t.all() or not t.any():
            return t.clone()
        return torch.randint(0, 2, t.shape, generator=gen).bool()
    if not t.dtype.is_floating_point and not t.dtype.is_complex:
        lo, hi = int(t.min()), int(t.max()) if t.numel() else (0, 0)
        return torch.randint(lo, hi + 1, t.shape, generator=gen, dtype=torch.int64).to(t.dtype)
    f = t.detach().double()
    mean = float(f.mean()) if f.numel() else 0.0
    std = float(f.std()) if f.numel() > 1 else 1.0
    if not math.isfinite(std) or std == 0.0:
        std = 1.0
    return (torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean).to(t.dtype)


def lint(gm: torch.fx.GraphModule, expected_outputs: Sequence | None = None) -> str | None:
    """The first problem found in the graph's structure, or None."""
    try:
        gm.graph.lint()
    except Exception as exc:  # torch's lint raises RuntimeError with the node in the text
        return f"graph lint failed: {exc}"
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            return f"{describe(node)} has no shape metadata (meta['val'])"
    if expected_outputs is not None:
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = torch.utils._pytree.tree_leaves(out_node.args[0])
        if len(outs) != len(expected_outputs):
            return f"graph returns {len(outs)} outputs, the model {len(expected_outputs)}"
        for i, (node, ref) in enumerate(zip(outs, expected_outputs, strict=True)):
            v = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
            mismatch = isinstance(ref, torch.Tensor) and isinstance(v, torch.Tensor)
            if mismatch and (tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype):
                return f"output #{i} ({describe(node)}) is {tensor_str(v)}, the model returns {tensor_str(ref)}"
    return None


def compare(actual: Sequence, expected: Sequence, options: ValidationOptions) -> ValidationResult:
    """Compare flat output lists under the per-dtype tolerances (NaN equals NaN)."""
    if len(actual) != len(expected):
        return ValidationResult(False, message=f"{len(actual)} outputs, expected {len(expected)}")
    max_abs = 0.0
    max_rel = 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if not isinstance(e, torch.Tensor):
            if a != e:
                return ValidationResult(False, message=f"output #{i} is {a!r}, expected {e!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            return ValidationResult(False, message=f"output #{i} is {tensor_str(a)}, expected {tensor_str(e)}")
        if not (e.dtype.is_floating_point or e.dtype.is_complex):
            if not torch.equal(a, e):
                return ValidationResult(False, max_abs, max_rel, f"output #{i} ({e.dtype}) differs")
            continue
        a64, e64 = a.detach().double(), e.detach().double()
        both_nan = torch.isnan(a64) & torch.isnan(e64)
        diff = (a64 - e64).abs().masked_fill(both_nan, 0.0)
        if torch.isnan(diff).any():
            return ValidationResult(False, math.nan, math.nan, f"output #{i} has NaN where the reference has none")
        if diff.numel():
            # relative to the output's scale (not elementwise, which explodes near zeros)
            max_abs = max(max_abs, float(diff.max()))
            scale = float(e64.abs().masked_fill(torch.isnan(e64), 0.0).max())
            max_rel = max(max_rel, float(diff.max()) / scale if scale > 0 else 0.0)
        tol = options.tolerance(e.dtype)
        bad = diff > tol.atol + tol.rtol * e64.abs()
        if bad.any():
            return ValidationResult(
                False,
                max_abs,
                max_rel,
                f"output #{i} differs by up to {float(diff.max()):.3g} "
                f"(tolerance atol={tol.atol:g}, rtol={tol.rtol:g}; {int(bad.sum())} of {e.numel()} elements)",
            )
    return ValidationResult(True, max_abs, max_rel)


class Validator:
    """Holds the validation input sets and their reference outputs for one pipeline run."""

    def __init__(
        self,
        reference: torch.fx.GraphModule,
        flat_inputs: Sequence,
        options: ValidationOptions,
        reference_outputs: Sequence | None = None,
    ):
        self.options = options
        self.input_sets: list[list] = [list(flat_inputs)]
        gen = torch.Generator().manual_seed(options.seed)
        for _ in range(options.random_inputs if options.mode == "numeric" else 0):
            self.input_sets.append([random_like(t, gen) if isinstance(t, torch.Tensor) else t for t in flat_inputs])
        self.references: list[list] = []
        if options.mode == "numeric":
            for k, inputs in enumerate(self.input_sets):
                if k == 0 and reference_outputs is not None:
                    self.references.append(list(reference_outputs))
                else:
                    self.references.append(run_flat(reference, inputs))
        self.expected_outputs = self.references[0] if self.references else None

    def check(self, gm: torch.fx.GraphModule) -> ValidationResult:
        if self.options.mode == "off":
            return ValidationResult(True)
        problem = lint(gm, self.expected_outputs)
        if problem:
            return ValidationResult(False, message=problem)
        if self.options.mode == "lint":
            return ValidationResult(True)
        worst = ValidationResult(True, 0.0, 0.0)
        for inputs, expected in zip(self.input_sets, self.references, strict=True):
            try:
                actual = run_flat(gm, inputs)
            except Exception as exc:
                return ValidationResult(False, message=f"the graph fails to run: {type(exc).__name__}: {exc}")
            result = compare(actual, expected, self.options)
            if not result.ok:
                return result
            worst.max_abs_error = max(worst.max_abs_error or 0.0, result.max_abs_error or 0.0)
            worst.max_rel_error = max(worst.max_rel_error or 0.0, result.max_rel_error or 0.0)
        return worst


def run_flat(gm: torch.fx.GraphModule, flat_inputs: Sequence) -> list:
    """Run a canonical GraphModule on flat inputs (placeholder order) and return flat outputs."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    with torch.no_grad():
        if info is not None and info.in_spec is not None:
            args, kwargs = torch.utils._pytree.tree_unflatten(list(flat_inputs), info.in_spec)
            out = gm(*args, **kwargs)
        else:
            out = gm(*flat_inputs)
    return torch.utils._pytree.tree_leaves(out)
