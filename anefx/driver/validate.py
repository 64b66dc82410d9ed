"""Validation: is the rewritten graph still the model?

Three levels, chosen with ``ValidationOptions.mode`` (or ``ANEFX_VALIDATE=off|lint|example|numeric``):

* ``lint``: ``torch.fx.Graph.lint()`` plus anefx's invariants (every node has shape metadata, the
  outputs keep their shapes and dtypes).
* ``numeric`` (default): lint, then run the graph on several input sets and compare every output
  with the reference (the graph as captured, before any pass) under a per-dtype tolerance. Errors
  never accumulate unseen: each pass is measured against the original, not against the pass before it.
* ``example``: for models where a run costs minutes (Whisper-large-v3's encoder: ~40 s on one
  core), the same input sets and references, but each pass is checked on the example set only; the
  pipeline's final graph is checked on every set (:meth:`Pipeline.run` runs the pipeline again in
  ``numeric`` mode when it fails there, so a pass that breaks another set is still found and rolled
  back), and so is the converted program (the artifact check executes it on every set).

The input sets:

* the example inputs;
* ``random_inputs`` seeded random sets of the same shapes and dtypes, each value in the example's
  domain (token ids stay valid ids; see :func:`random_like`);
* when an input is *mask-like* (:func:`mask_like`), ``stress_inputs`` sets whose masks are the ones
  that steer the computation: padding runs on the right, padding runs on the left, and rows with all
  keys masked but one (the random sets give masks with random holes). A pass that ignores a mask is
  thus caught even when the example's mask keeps everything. Their other inputs are the last random
  set's (the same tensors). Models without a mask-like input pay nothing for it.

Tolerances are relative to each output's scale (see :class:`Tolerance`).

Rows whose keys are all masked (the rule): an attention query row that masks every key has no
meaning, and torch resolves it differently per spelling (``scaled_dot_product_attention`` returns
zeros, a softmax over ``-inf`` NaN, a softmax over ``finfo.min`` the mean of V). Stress masks make
such rows (left padding in a causal model, for instance). Validation compares only the output
elements that do not depend on how these rows are resolved: the reference is run a second time with
those rows resolved otherwise (:class:`_FullyMaskedRows`), and elements that change are not
compared; nor are elements the reference leaves NaN. Everything else, infinities included, must
match. With the example inputs and masks that keep a key in every row, everything is compared.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from anefx.compat.torch import pytree_info, tree_leaves, tree_unflatten, write_count
from anefx.ir.graph import clone_graph_module, describe, refresh_meta, tensor_str
from anefx.ir.sites import Site, SiteFilter, SiteSelection

Mode = Literal["off", "lint", "example", "numeric"]
#: the modes that compute references on input sets (``example`` checks passes on the first only)
NUMERIC_MODES = ("example", "numeric")


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol * scale + rtol * |expected|`` elementwise, where ``scale`` is
    the largest finite ``|expected|`` of that output.

    Both terms are relative: an output whose values are ~1e-5 (the probabilities of a 50k-way
    softmax) is held to ~1e-10, not to a fixed 1e-4 that would let any answer through. An output
    that is exactly zero everywhere must stay (almost) exactly zero.
    """

    atol: float  #: relative to the output's scale
    rtol: float  #: relative to each element


DEFAULT_TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-9, 1e-7),
    torch.float32: Tolerance(2e-5, 1e-4),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
}


@dataclass(frozen=True)
class ValidationOptions:
    """How the pipeline checks each pass."""

    mode: Mode = "numeric"
    #: Seeded random input sets besides the example inputs.
    random_inputs: int = 1
    #: Input sets with stress masks (right padding, left padding, all-masked-but-one rows), added
    #: only when the model has a mask-like input; at most three patterns, so at most three sets.
    stress_inputs: int = 3
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
    An integer input whose rows count up by one (positions: ``position_ids``, a cache's write
    positions) stays a run of consecutive values in ``[min, max]``: positions drawn independently
    repeat and go backwards, which a causal step function's callers never do (and which, written
    into a cache, leaves order-dependent values).
    """
    if t.dtype == torch.bool:
        if t.numel() == 0 or t.all() or not t.any():
            return t.clone()
        return torch.randint(0, 2, t.shape, generator=gen).bool()
    if not t.dtype.is_floating_point and not t.dtype.is_complex:
        lo, hi = int(t.min()), int(t.max()) if t.numel() else (0, 0)
        if t.dim() and t.shape[-1] >= 2 and bool((t[..., 1:] - t[..., :-1] == 1).all()):
            n = t.shape[-1]
            start = int(torch.randint(lo, hi - n + 2, (1,), generator=gen))
            return torch.arange(start, start + n, dtype=torch.int64).expand(t.shape).to(t.dtype).clone()
        return torch.randint(lo, hi + 1, t.shape, generator=gen, dtype=torch.int64).to(t.dtype)
    f = t.detach().double()
    mean = float(f.mean()) if f.numel() else 0.0
    std = float(f.std()) if f.numel() > 1 else 1.0
    if not math.isfinite(std) or std == 0.0:
        std = 1.0
    return (torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean).to(t.dtype)


#: Values at or below this count as "masked" in an additive float mask.
MASK_NEGATIVE = -1e4
#: Integer inputs used as indices by these ops are ids, never masks.
_INDEXING = {
    torch.ops.aten.embedding.default: (1,),
    torch.ops.aten.index.Tensor: (1,),
    torch.ops.aten.index_select.default: (2,),
    torch.ops.aten.gather.default: (2,),
    torch.ops.aten.take.default: (1,),
    torch.ops.aten.one_hot.default: (0,),
}
STRESS_PATTERNS = ("right_padding", "left_padding", "one_kept")


@dataclass(frozen=True)
class MaskLike:
    """A mask-like input: which value keeps a position and which one masks it."""

    keep: float | int | bool
    masked: float | int | bool


def _used_as_index(node: torch.fx.Node) -> bool:
    """Whether the integer value of ``node`` reaches an indexing op as the index (through integer
    arithmetic, views and casts that stay integer)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            positions = _INDEXING.get(user.target)
            if positions is not None:
                for i in positions:
                    arg = user.args[i] if i < len(user.args) else None
                    if arg is n or (isinstance(arg, (list, tuple)) and n in arg):
                        return True
            v = user.meta.get("val")
            if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool:
                stack.append(user)
    return False


def mask_like(t, node: torch.fx.Node | None = None) -> MaskLike | None:
    """Whether the input ``t`` (placeholder ``node``) looks like an attention mask, and its values.

    * a bool tensor;
    * an integer tensor of 0s and 1s that is never used as an index (ids, positions, token types
      are indices);
    * a float tensor of 0s and at least one large negative (≤ ``MASK_NEGATIVE`` or ``-inf``): an
      additive mask. A float input of zeros only is not recognised (nothing tells it from data).

    The value that *keeps* is the most frequent one in the example (masks keep more than they
    drop), so both polarities (``True`` = attend, ``True`` = masked) are handled. Scalars and
    tensors whose last axis has fewer than 2 positions have nothing to pad.
    """
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] < 2 or t.is_complex():
        return None
    if t.dtype == torch.bool:
        keep = bool(t.sum() * 2 >= t.numel())
        return MaskLike(keep, not keep)
    if not t.dtype.is_floating_point:
        if not bool(((t == 0) | (t == 1)).all()) or (node is not None and _used_as_index(node)):
            return None
        keep = int(t.sum() * 2 >= t.numel())
        return MaskLike(keep, 1 - keep)
    negative = t <= MASK_NEGATIVE
    if not bool((negative | (t == 0)).all()) or not bool(negative.any()):
        return None
    return MaskLike(0.0, float(t.min()))


def stress_mask(t: torch.Tensor, spec: MaskLike, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """A mask of ``t``'s shape and dtype whose last axis (the keys) follows ``pattern``.

    ``right_padding`` / ``left_padding``: per batch element (axis 0), a run of 1 … S-1 masked
    positions at the end / start, the same for every row of that element (a padding mask);
    ``one_kept``: every row keeps exactly one key, at a random position; ``holes``: random
    positions masked, every row keeping at least one.
    """
    s = t.shape[-1]
    rows = t.reshape(-1, s).shape[0]
    batch = t.shape[0] if t.dim() > 1 else 1
    keep = torch.ones(rows, s, dtype=torch.bool)
    pos = torch.arange(s)
    if pattern in ("right_padding", "left_padding"):
        runs = torch.randint(1, s, (batch,), generator=gen).repeat_interleave(rows // batch)
        keep = pos < (s - runs)[:, None] if pattern == "right_padding" else pos >= runs[:, None]
    elif pattern == "one_kept":
        keep = pos == torch.randint(0, s, (rows, 1), generator=gen)
    elif pattern == "holes":
        keep = torch.rand(rows, s, generator=gen) > 0.3
        keep[torch.arange(rows), torch.randint(0, s, (rows,), generator=gen)] = True
    else:
        raise ValueError(f"unknown mask pattern {pattern!r}; known: {(*STRESS_PATTERNS, 'holes')}")
    keep = keep.reshape(t.shape)
    out = torch.full(t.shape, spec.masked, dtype=t.dtype)
    return out.masked_fill(keep, spec.keep)


def lint(gm: torch.fx.GraphModule, expected_outputs: Sequence | None = None, require_meta: bool = True) -> str | None:
    """The first problem found in the graph's structure, or None. ``require_meta=False`` for graphs
    anefx does not rewrite further (the converter's input), whose checks carry no shape metadata."""
    try:
        gm.graph.lint()
    except Exception as exc:  # torch's lint raises RuntimeError with the node in the text
        return f"graph lint failed: {exc}"
    for node in gm.graph.nodes if require_meta else ():
        if node.op == "call_function" and "val" not in node.meta:
            return f"{describe(node)} has no shape metadata (meta['val'])"
    if expected_outputs is not None:
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = tree_leaves(out_node.args[0])
        if len(outs) != len(expected_outputs):
            return f"graph returns {len(outs)} outputs, the model {len(expected_outputs)}"
        for i, (node, ref) in enumerate(zip(outs, expected_outputs, strict=True)):
            v = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
            mismatch = isinstance(ref, torch.Tensor) and isinstance(v, torch.Tensor)
            if mismatch and (tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype):
                return f"output #{i} ({describe(node)}) is {tensor_str(v)}, the model returns {tensor_str(ref)}"
    return None


class _FullyMaskedRows(torch.fx.Interpreter):
    """Runs a graph with the attention rows whose keys are all masked resolved otherwise (their
    output shifted by one), to find the output elements that depend on them."""

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.op != "call_function" or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if n.target in (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int):
            x = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
            dim = n.args[1]
            dead = (x <= MASK_NEGATIVE / 2).all(dim=dim, keepdim=True) | torch.isnan(x).all(dim=dim, keepdim=True)
            return torch.where(dead, torch.ones_like(out), out) if bool(dead.any()) else out
        if n.target == torch.ops.aten.scaled_dot_product_attention.default:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            a = dict(zip(names, n.args)) | dict(n.kwargs)
            q, k = (self.env[a[x]] for x in ("query", "key"))
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
            if a.get("is_causal"):
                keep = keep.tril()
            mask = a.get("attn_mask")
            if isinstance(mask, torch.fx.Node):
                m = self.env[mask]
                keep = keep & (m if m.dtype == torch.bool else m > MASK_NEGATIVE / 2)
            dead = ~keep.any(dim=-1, keepdim=True)
            return torch.where(dead, out + 1.0, out) if bool(dead.any()) else out
        return out


def undefined_elements(reference: torch.fx.GraphModule, flat_inputs: Sequence, expected: Sequence) -> list | None:
    """Per output, the elements that depend on attention rows whose keys are all masked (or None
    when no element does); see the module docstring."""
    with torch.no_grad():
        out = _FullyMaskedRows(reference).run(*flat_inputs)  # placeholders take the flat inputs
    alt = tree_leaves(out)
    masks = []
    for a, e in zip(alt, expected, strict=False):
        if isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor) and e.is_floating_point():
            masks.append(~((a == e) | (torch.isnan(a) & torch.isnan(e))))
        else:
            masks.append(None)
    return masks if any(m is not None and bool(m.any()) for m in masks) else None


def compare(
    actual: Sequence, expected: Sequence, options: ValidationOptions, undefined: Sequence | None = None
) -> ValidationResult:
    """Compare flat output lists under the per-dtype tolerances, relative to each output's scale.

    Elements the reference leaves undefined (NaN) are not compared; everything else must match,
    infinities exactly.
    """
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
        defined = ~torch.isnan(e64)  # torch defines no value where the reference is NaN
        if undefined is not None and i < len(undefined) and undefined[i] is not None:
            defined &= ~undefined[i]  # depends on attention rows whose keys are all masked
        finite = torch.isfinite(e64)
        same_inf = ~finite & defined & (a64 == e64)
        diff = (a64 - e64).abs().masked_fill(~defined | same_inf, 0.0)
        if torch.isnan(diff).any() or torch.isinf(diff).any():
            bad = int((torch.isnan(diff) | torch.isinf(diff)).sum())
            return ValidationResult(
                False,
                math.inf,
                math.inf,
                f"output #{i} is NaN or infinite at {bad} elements where the reference is not",
            )
        scale = float(e64.abs().masked_fill(~finite, 0.0).max()) if e64.numel() else 0.0
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max()) / scale if scale > 0 else (math.inf if diff.max() > 0 else 0.0))
        tol = options.tolerance(e.dtype)
        floor = torch.finfo(e.dtype).tiny if e.dtype.is_floating_point else 0.0
        bad = diff > tol.atol * max(scale, floor) + tol.rtol * e64.abs().masked_fill(~finite, 0.0)
        if bad.any():
            return ValidationResult(
                False,
                max_abs,
                max_rel,
                f"output #{i} differs by up to {float(diff.max()):.3g}, {float(diff.max()) / max(scale, floor):.3g} "
                f"of its scale {scale:.3g} (tolerance atol={tol.atol:g} of the scale, rtol={tol.rtol:g}; "
                f"{int(bad.sum())} of {e.numel()} elements)",
            )
    return ValidationResult(True, max_abs, max_rel)


class Recomputed(Sequence):
    """Reference outputs held only for the example set: set ``k``'s are ``reference`` run on
    ``input_sets[k]`` each time they are read (the same values: the same graph on the same
    tensors), then dropped by the reader. For a chunk of a chain, whose references on its function's
    sets (a new cache per layer per set: Whisper-large-v3's decoder, 0.15 GB per set) would
    otherwise be held from the split to the artifact check, for every chunk at once."""

    def __init__(self, reference: torch.fx.GraphModule, input_sets: list[list], example: list):
        self.reference, self.input_sets, self.example = reference, input_sets, list(example)
        self._stamp = self._state()

    def _state(self) -> tuple:
        """The graph's code and its tensors' identities and write counts: a reference changed in
        place would give other references than the ones the example's were computed with."""
        gm = self.reference
        tensors = [*gm.parameters(), *gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]
        return gm.code, tuple((t.data_ptr(), write_count(t)) for t in tensors)

    def __len__(self) -> int:
        return len(self.input_sets)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = k + len(self) if k < 0 else k
        if not 0 <= k < len(self):
            raise IndexError(k)
        if k == 0:
            return self.example
        if self._state() != self._stamp:
            raise RuntimeError(
                "the reference graph changed in place since its example outputs were computed: its outputs "
                "are no longer the references"
            )
        return run_flat(self.reference, self.input_sets[k])


class Validator:
    """Holds the validation input sets and their reference outputs for one pipeline run."""

    def __init__(
        self,
        reference: torch.fx.GraphModule,
        flat_inputs: Sequence,
        options: ValidationOptions,
        reference_outputs: Sequence | None = None,
        *,
        given: tuple[Sequence[str], Sequence[Sequence], Sequence[Sequence]] | None = None,
        masked: bool = False,
    ):
        """``given``: ``(set names, input sets, reference outputs)`` computed elsewhere, taken as they
        are (no set is drawn; the first set is the example): a chunk of a chain checked on its
        function's sets, carried through the chain. Reference outputs ``None``: ``reference``'s
        outputs, the example's kept, the other sets' computed each time they are read
        (:class:`Recomputed`). ``masked``: look for
        output elements that depend on fully masked attention rows on every set but the example
        even when no input of ``reference`` is mask-like (a chunk whose function has masks)."""
        self.options = options
        self.reference = reference
        self.input_sets: list[list] = [list(flat_inputs)]
        self.set_names: list[str] = ["example"]
        self.masks: dict[int, MaskLike] = {}  # flat input index -> its mask values
        self.references: list[list] = []
        if given is not None and options.mode in NUMERIC_MODES:
            names, sets, refs = given
            if len(names) != len(sets) or not sets or (refs is not None and len(refs) != len(sets)):
                raise ValueError(f"given input sets: {len(names)} names, {len(sets)} sets")
            self.set_names, self.input_sets = list(names), [list(s) for s in sets]
            if refs is None:  # the example's computed now, the others' each time they are read
                self.references = Recomputed(reference, self.input_sets, run_flat(reference, self.input_sets[0]))
            else:
                self.references = [list(r) for r in refs]
            self.masks = self._mask_inputs(reference, self.input_sets[0])
        elif options.mode in NUMERIC_MODES:
            self._add_sets(reference, list(flat_inputs))
            for k, inputs in enumerate(self.input_sets):
                if k == 0 and reference_outputs is not None:
                    self.references.append(list(reference_outputs))
                else:
                    self.references.append(run_flat(reference, inputs))
        self.expected_outputs = self.references[0] if self.references else None
        self.undefined: list = [None] * len(self.references)
        for k in range(1, len(self.references)):  # the example set is compared everywhere
            if self.masks or masked:
                self.undefined[k] = undefined_elements(reference, self.input_sets[k], self.references[k])

    @staticmethod
    def _mask_inputs(reference: torch.fx.GraphModule, flat: list) -> dict[int, MaskLike]:
        placeholders = [n for n in reference.graph.nodes if n.op == "placeholder"]
        nodes = placeholders if len(placeholders) == len(flat) else [None] * len(flat)
        return {i: m for i, (t, n) in enumerate(zip(flat, nodes)) if (m := mask_like(t, n)) is not None}

    def _add_sets(self, reference: torch.fx.GraphModule, flat: list) -> None:
        gen = torch.Generator().manual_seed(self.options.seed)
        self.masks = masks = self._mask_inputs(reference, flat)

        def one_set(pattern: str, values: list | None = None) -> list:
            out = []
            for i, t in enumerate(flat):
                if i in masks:
                    out.append(stress_mask(t, masks[i], pattern, gen))
                elif values is not None:
                    out.append(values[i])
                else:
                    out.append(random_like(t, gen) if isinstance(t, torch.Tensor) else t)
            return out

        for _ in range(self.options.random_inputs):
            self.input_sets.append(one_set("holes"))
            self.set_names.append("random" + (" (masks with holes)" if masks else ""))
        if masks:
            # the stress sets vary the masks: their other inputs are the last random set's (shared,
            # not copied: an encoder-decoder's random caches are 0.6 GB per set at Whisper-large size)
            values = self.input_sets[-1] if self.options.random_inputs else None
            for pattern in STRESS_PATTERNS[: self.options.stress_inputs]:
                self.input_sets.append(one_set(pattern, values))
                self.set_names.append(f"stress: masks with {pattern.replace('_', ' ')}")

    def release_references(self) -> None:
        """Hold the example's reference outputs only: every other set's are ``reference`` run on
        that set each time they are read (:class:`Recomputed`, which refuses if the reference graph
        was changed in place since). For a validator kept after its pipeline ran (the hand-off's,
        read again by the converter-input and artifact checks): an encoder-decoder's step functions
        hold a new cache per layer per set (Whisper-large-v3: ~2.3 GB over its three functions),
        which would otherwise stay alive from each function's passes to the end of the compile.
        Each later read of a set costs one run of the reference graph on it."""
        if isinstance(self.references, Recomputed) or len(self.references) < 2:
            return
        self.references = Recomputed(self.reference, self.input_sets, self.references[0])

    def keep_example_only(self) -> None:
        """Drop every input set but the example (with their references): for a graph whose further
        checks run elsewhere (a program split into chunks, each with a validator of its own)."""
        del self.input_sets[1:], self.set_names[1:], self.undefined[1:]
        self.references = list(self.references[:1])

    def check(self, gm: torch.fx.GraphModule, require_meta: bool = True, every_set: bool = False) -> ValidationResult:
        """Lint ``gm`` and, in the numeric modes, compare its outputs with the references: on every
        input set (``numeric``, or ``every_set``) or on the example set only (``example``)."""
        if self.options.mode == "off":
            return ValidationResult(True)
        problem = lint(gm, self.expected_outputs, require_meta)
        if problem:
            return ValidationResult(False, message=problem)
        if self.options.mode == "lint":
            return ValidationResult(True)
        worst = ValidationResult(True, 0.0, 0.0)
        sets = zip(self.set_names, self.input_sets, self.references, self.undefined, strict=True)
        if self.options.mode == "example" and not every_set:
            sets = itertools.islice(sets, 1)
        for name, inputs, expected, undefined in sets:
            try:
                actual = run_flat(gm, inputs)
            except Exception as exc:
                return ValidationResult(False, message=f"the graph fails to run: {type(exc).__name__}: {exc}")
            result = compare(actual, expected, self.options, undefined)
            if not result.ok:
                if name != "example":
                    result.message = f"{result.message} [inputs: {name}]"
                return result
            worst.max_abs_error = max(worst.max_abs_error or 0.0, result.max_abs_error or 0.0)
            worst.max_rel_error = max(worst.max_rel_error or 0.0, result.max_rel_error or 0.0)
        return worst


class InputMutationError(RuntimeError):
    """A run wrote into one of its inputs although the graph shows no in-place write to it."""


def written_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Positions of the placeholders the graph writes in place (directly or through a view)."""
    from anefx.analysis.legalize import mutated_nodes

    written = mutated_nodes(gm.graph)
    return {i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder") if n in written}


def run_flat(gm: torch.fx.GraphModule, flat_inputs: Sequence) -> list:
    """Run a canonical GraphModule on flat inputs (placeholder order) and return flat outputs.

    The inputs are never changed: input sets are shared (the stress sets hold the random set's
    tensors, an encoder-decoder's prefill and decode one set of example states), so a write into
    one would corrupt every later run that reads it. An input the graph writes in place (a cache
    updated with ``index_copy_``) is cloned first; a write the graph does not show (a module called
    opaquely) is caught by the tensors' version counters and raises :class:`InputMutationError`."""
    # torch has no public accessor for a GraphModule's input spec; torch.fx.Interpreter would take
    # flat inputs but dispatches node by node in Python, on every validation run
    flat = list(flat_inputs)
    for i in written_inputs(gm):
        if i < len(flat) and isinstance(flat[i], torch.Tensor):
            flat[i] = flat[i].clone()
    versions = [(i, t, write_count(t)) for i, t in enumerate(flat) if isinstance(t, torch.Tensor)]
    info = pytree_info(gm.graph)
    with torch.no_grad():
        if info is not None and info.in_spec is not None:
            args, kwargs = tree_unflatten(flat, info.in_spec)
            out = gm(*args, **kwargs)
        else:
            out = gm(*flat)
    changed = [i for i, t, v in versions if write_count(t) != v and t is flat_inputs[i]]
    if changed:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        raise InputMutationError(
            f"running the graph wrote into its input(s) {[names[i] if i < len(names) else i for i in changed]}, "
            "which the graph does not show as written: the shared input sets would be corrupted"
        )
    return tree_leaves(out)


#: A transformation for :func:`apply_validated`: rewrites the GraphModule it is given (a clone)
#: where the filter allows, returns (graph module, modified, stats).
Transform = Callable[[torch.fx.GraphModule, SiteFilter], tuple[torch.fx.GraphModule, bool, dict]]


@dataclass
class Applied:
    """The outcome of :func:`apply_validated`."""

    graph_module: torch.fx.GraphModule | None  #: the validated result; None when nothing is kept
    modified: bool
    stats: dict
    verdict: ValidationResult  #: of the kept result, or the first failure when nothing is kept
    sites: list[Site]  #: every site the transformation declared (first run)
    excluded: list[tuple[Site, str]]  #: sites dropped, each with its validation error
    seconds: float = 0.0  #: running the transformation (all runs)
    validation_seconds: float = 0.0
    runs: int = 0


def apply_validated(
    transform: Transform,
    gm: torch.fx.GraphModule,
    flat_inputs: Sequence,
    validator: Validator,
    *,
    max_runs: int = 16,
    refused: Collection[str] = frozenset(),
) -> Applied:
    """Apply ``transform`` to a clone of ``gm`` and validate it; when it fails, drop its failing
    sites (found by bisection) and keep the rest, or drop it whole. ``gm`` is never modified.
    Sites named in ``refused`` are never rewritten (the never-worse guard keeps their region in its
    original form); ``Applied.sites`` still lists them, ``Applied.excluded`` does not.

    Bisection stops after ``max_runs`` runs of the transformation (each is validated on every
    input set): the sites not yet told apart are then all dropped, which is safe (the result
    without them is validated once more) but may drop good sites along with bad ones."""
    timing = {"run": 0.0, "check": 0.0, "runs": 0}

    def attempt(selection: SiteSelection):
        timing["runs"] += 1
        t0 = time.perf_counter()
        try:
            work, modified, stats = transform(clone_graph_module(gm), selection)
            if modified:
                refresh_meta(work, flat_inputs)
        except Exception as exc:  # a transformation that raises is rolled back like one that validates badly
            timing["run"] += time.perf_counter() - t0
            first = str(exc).strip().split("\n\n")[0]  # not the traceback torch.fx appends
            return None, False, {}, ValidationResult(False, message=f"raised {type(exc).__name__}: {first}")
        t1 = time.perf_counter()
        timing["run"] += t1 - t0
        verdict = validator.check(work) if modified else ValidationResult(True)
        timing["check"] += time.perf_counter() - t1
        return work, modified, stats, verdict

    def done(work, modified, stats, verdict, sites, excluded) -> Applied:
        keep = work if verdict.ok else None
        return Applied(keep, modified, stats, verdict, sites, excluded, timing["run"], timing["check"], timing["runs"])

    refused = frozenset(refused)
    first = SiteSelection(excluded=refused)
    work, modified, stats, verdict = attempt(first)
    sites = list(first.visited.values())
    allowed = [s for s in sites if s.name not in refused]
    if verdict.ok or len(allowed) < 2:
        excluded = [(site, str(verdict.message)) for site in allowed] if not verdict.ok else []
        return done(work, modified, stats, verdict, sites, excluded)

    def failing(group: list[Site], message: str) -> list[tuple[Site, str]]:
        """The sites of ``group`` (which fails when enabled alone) that fail by themselves."""
        if len(group) == 1:
            return [(group[0], message)]
        found: list[tuple[Site, str]] = []
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            if timing["runs"] >= max_runs:
                return [(s, "not bisected further (too many runs)") for s in group]
            *_, v = attempt(SiteSelection(only={s.name for s in half}))
            if not v.ok:
                found += failing(half, str(v.message))
        return found or [(s, f"fails only together with others: {message}") for s in group]

    excluded = failing(allowed, str(verdict.message))
    bad = {s.name for s, _ in excluded}
    if len(bad) < len(allowed):
        work, modified, stats, final = attempt(SiteSelection(excluded=bad | refused))
        if final.ok:
            return done(work, modified, stats, final, sites, excluded)
    return done(None, modified, stats, verdict, sites, excluded)
