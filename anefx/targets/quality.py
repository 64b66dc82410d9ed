"""What weight compression costs, measured in PyTorch on the weights that ship.

The compressed ML Program holds each compressed weight as a ``constexpr_lut_to_dense`` (LUT),
``constexpr_blockwise_shift_scale`` or ``constexpr_affine_dequantize`` op over const inputs.
:func:`decompressed_weights` expands them (with coremltools' own op semantics), maps each one back
to the FX node of the exported program it stands for (:mod:`anefx.targets.compression` names
them), and :class:`WeightSwap` runs that exported program — the rewritten graph exactly as it was
converted — with those node values swapped in. Nothing is written back: the user's model, the
compiled graph and the fp16 package keep their weights.

The reference is the *fp16 package*: the same graph run with the uncompressed program's fp16
weights, so the figures isolate compression from fp16 rounding. Reported: per weight the relative
error of the weight, per layer the relative error of the op that reads it, end to end the output
error; for language models :func:`lm_agreement` gives next-token agreement and mean KL divergence
over a prompt set, for any pair of ``ids → logits`` callables (a full-sequence forward here;
``compile_lm``'s stateful prefill later).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from anefx.compat.coremltools import operations
from anefx.targets.mil.interpreter import constant_value

_COMPRESSED_SUFFIX = re.compile(r"^(?P<const>.+)_(?:palettized|quantized)$")
#: constexpr ops that stand for a whole (dense) weight at the top of a decompression chain.
_CONSTEXPR = ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "constexpr_affine_dequantize")


def const_values(mlmodel, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The values of the ``const`` ops of ``main`` (optionally only ``names``)."""
    out = {}
    for op in operations(mlmodel):
        if op.op_type == "const" and (names is None or op.name in names):
            out[op.name] = op.outputs[0].val
    return out


def decompressed_weights(mlmodel) -> dict[str, np.ndarray]:
    """Original const name → the dense weight its constexpr chain expands to (fp16).

    Chains (e.g. a LUT whose table is itself quantized) are followed to the op whose output
    feeds real computation; its name, minus coremltools' ``_palettized``/``_quantized`` suffix,
    is the name the const had before compression."""
    out = {}
    for op in operations(mlmodel):
        if not op.op_type.startswith("constexpr_"):
            continue
        children = op.outputs[0].child_ops
        if children and all(c.op_type.startswith("constexpr_") for c in children):
            continue  # an inner link of a chain
        if op.op_type not in _CONSTEXPR:
            raise NotImplementedError(f"anefx cannot read back {op.op_type} ({op.name}) to measure it")
        m = _COMPRESSED_SUFFIX.match(op.name)
        name = m.group("const") if m else op.name
        out[name] = constant_value(op.outputs[0]).numpy()
    return out


def decode_lut(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``constexpr_lut_to_dense`` (iOS18) written out: ``lut`` has one table per block of the weight
    (shape ``[*blocks, 2**bits, 1]``); each weight reads the entry its index names in its block's table.
    (Used by the tests to check coremltools' expansion independently.)"""
    out = np.empty(indices.shape, dtype=lut.dtype)
    block = [indices.shape[d] // lut.shape[d] for d in range(indices.ndim)]
    for blk in np.ndindex(*lut.shape[: indices.ndim]):
        sl = tuple(slice(b * n, (b + 1) * n) for b, n in zip(blk, block, strict=True))
        out[sl] = lut[blk][:, 0][indices[sl]]
    return out


class WeightSwap:
    """Runs an ``ExportedProgram``'s graph with some node values replaced (by node name).

    ``swap(inputs, overrides, record)`` returns the user outputs and the values of the ``record``
    nodes. Parameters and buffers come from the program's state dict, read only.
    ``swap_stateful(inputs, overrides, buffers)`` also takes the values of mutated buffers (a
    stateful program's states, by buffer name) and returns their new values instead of writing them."""

    def __init__(self, exported_program):
        from torch.export.graph_signature import InputKind, OutputKind

        self.ep = exported_program
        sig = exported_program.graph_signature
        self._inputs = []
        self._targets: list[str | None] = []
        for spec in sig.input_specs:
            self._targets.append(spec.target if spec.kind == InputKind.BUFFER else None)
            if spec.kind == InputKind.USER_INPUT:
                self._inputs.append(None)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                value = exported_program.state_dict.get(spec.target)
                if value is None:
                    value = exported_program.constants[spec.target]
                self._inputs.append(value)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self._inputs.append(exported_program.constants[spec.target])
            else:
                raise NotImplementedError(f"cannot run an exported program input of kind {spec.kind}")
        self._user_out = [i for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        self._mutated = {i: s.target for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.BUFFER_MUTATION}
        self.nodes = {n.name: n for n in exported_program.graph.nodes}

    def node_values(self, names: set[str], inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.swap(inputs, {}, names)[1]

    def swap(
        self, inputs: Sequence[torch.Tensor], overrides: dict[str, torch.Tensor], record: set[str] = frozenset()
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        outs, recorded = self._run(inputs, overrides, record, {})
        return [outs[i] for i in self._user_out], recorded

    def swap_stateful(
        self, inputs: Sequence[torch.Tensor], overrides: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """User outputs, and the new value of every buffer the program mutates (``buffers`` unchanged)."""
        outs, _ = self._run(inputs, overrides, frozenset(), buffers)
        return [outs[i] for i in self._user_out], {t: outs[i] for i, t in self._mutated.items()}

    def _run(self, inputs, overrides, record, buffers):
        user = iter(inputs)
        args = [
            next(user) if v is None else buffers.get(t, v) if t is not None else v
            for v, t in zip(self._inputs, self._targets, strict=True)
        ]
        recorded: dict[str, torch.Tensor] = {}

        class _Swapping(torch.fx.Interpreter):
            def run_node(self, n):
                if n.name in overrides:
                    if n.op == "placeholder":
                        super().run_node(n)  # consume its argument
                    return overrides[n.name]
                out = super().run_node(n)
                if n.name in record:
                    recorded[n.name] = out
                return out

        with torch.no_grad():
            outs = _Swapping(self.ep.graph_module).run(*args)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return outs, recorded


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den else float((a - b).norm())


@dataclass
class WeightError:
    param: str
    const: str
    scheme: str
    shape: tuple[int, ...]
    weight_rel_error: float  # ‖W_c - W_16‖ / ‖W_16‖
    output_rel_error: float | None = None  # of the op reading the weight, end-to-end compressed run


@dataclass
class LMQuality:
    """Next-token agreement and KL divergence of a candidate against a reference, teacher forced on
    the reference's own greedy continuations (``tokens`` positions over ``prompts`` prompts)."""

    agreement: float  # fraction of positions where argmax(candidate) == argmax(reference)
    mean_kl: float  # mean KL(reference ‖ candidate) of the next-token distributions, nats
    max_kl: float
    tokens: int
    prompts: int
    first_disagreement: list[int | None] = field(default_factory=list)  # per prompt, new-token index


@dataclass
class CompressionQuality:
    """Size against quality for one compression of one program."""

    scheme: str
    bytes_fp16: int  # weight bytes of the uncompressed program (consts; what weight.bin holds)
    bytes_compressed: int
    weights: list[WeightError]
    end_to_end_rel_error: float  # ‖y_c - y_16‖ / ‖y_16‖ over the outputs, on the example inputs
    end_to_end_max_abs: float
    fp16_rel_error: float  # the fp16 package against the fp32 rewritten graph (the floor)
    lm: LMQuality | None = None
    kept_fp16: dict[str, str] = field(default_factory=dict)  # const → reason

    @property
    def size_ratio(self) -> float:
        return self.bytes_compressed / self.bytes_fp16 if self.bytes_fp16 else 1.0

    def summary(self) -> dict[str, Any]:
        out = {
            "scheme": self.scheme,
            "size_ratio": round(self.size_ratio, 4),
            "MB": round(self.bytes_compressed / 1e6, 2),
            "MB_fp16": round(self.bytes_fp16 / 1e6, 2),
            "end_to_end_rel_error": float(f"{self.end_to_end_rel_error:.3g}"),
            "compressed_weights": len(self.weights),
            "kept_fp16": len(self.kept_fp16),
        }
        if self.lm is not None:
            out |= {"agreement": round(self.lm.agreement, 4), "mean_kl": float(f"{self.lm.mean_kl:.3g}")}
        return out

    def rich_table(self, top: int = 12):
        from rich.table import Table

        table = Table(title=f"compression {self.scheme}: worst layers (of {len(self.weights)})")
        for col in ("parameter", "scheme", "shape", "weight rel err", "layer output rel err"):
            table.add_column(col)
        worst = sorted(self.weights, key=lambda w: -(w.output_rel_error or w.weight_rel_error))[:top]
        for w in worst:
            out = "-" if w.output_rel_error is None else f"{w.output_rel_error:.2e}"
            table.add_row(w.param, w.scheme, "x".join(map(str, w.shape)), f"{w.weight_rel_error:.2e}", out)
        return table

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(self.rich_table())
        console.print(" ".join(f"{k}={v}" for k, v in self.summary().items()))
        return buf.getvalue()


def program_weight_bytes(mlmodel, threshold: int = 0) -> int:
    """Bytes of the weights a program stores: every const and constexpr input, at its MIL bit
    width (``uint6`` indices count 6 bits), the way ``weight.bin`` holds them (without its 64-byte
    alignment). Literals below ``threshold`` elements (shapes, axes) are left out."""
    from coremltools.converters.mil.mil import types

    total = 0
    for op in operations(mlmodel):
        if op.op_type != "const":
            continue
        var = op.outputs[0]
        val = var.val
        if not isinstance(val, np.ndarray) or val.size < max(threshold, 1):
            continue
        dtype = var.dtype if not types.is_tensor(var.sym_type) else var.sym_type.get_primitive()
        name = types.builtin_to_string(dtype)
        bits = int(re.sub(r"\D", "", name) or 32) if name not in ("bool",) else 8
        total += (val.size * bits + 7) // 8
    return total


def measure(
    swap: WeightSwap,
    weights,  # list[compression.WeightInfo]
    fp16_program,
    compressed_program,
    inputs: Sequence[torch.Tensor],
    scheme: str,
) -> CompressionQuality:
    """Per weight, per layer and end to end errors of ``compressed_program`` against ``fp16_program``."""
    comp_vals = decompressed_weights(compressed_program)
    for w in weights:  # what coremltools left alone ships (and is measured) as fp16
        if w.scheme != "fp16" and w.const not in comp_vals:
            w.scheme, w.reason = "fp16", "coremltools left it uncompressed"
    shipped = [w for w in weights if w.scheme != "fp16"]
    fp16_vals = const_values(fp16_program, {w.const for w in shipped})
    ref_over, cand_over = overrides_for(swap, shipped, fp16_vals), overrides_for(swap, shipped, comp_vals)
    consumers = {w.node: _consumer(swap, w.node) for w in shipped}
    record = {c for c in consumers.values() if c}
    ref_out, ref_rec = swap.swap(inputs, ref_over, record)
    cand_out, cand_rec = swap.swap(inputs, cand_over, record)
    fp32_out, _ = swap.swap(inputs, {})
    errors = []
    for w in shipped:
        c = consumers[w.node]
        errors.append(
            WeightError(
                param=w.param or w.const,
                const=w.const,
                scheme=w.scheme,
                shape=w.shape,
                weight_rel_error=_rel(cand_over[w.node], ref_over[w.node]),
                output_rel_error=_rel(cand_rec[c], ref_rec[c]) if c in cand_rec else None,
            )
        )
    num = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(cand_out, ref_out, strict=True))
    den = sum(float(b.double().norm() ** 2) for b in ref_out)
    f16 = sum(float((a.double() - b.double()).norm() ** 2) for a, b in zip(ref_out, fp32_out, strict=True))
    den32 = sum(float(b.double().norm() ** 2) for b in fp32_out)
    return CompressionQuality(
        scheme=scheme,
        bytes_fp16=program_weight_bytes(fp16_program, 64),
        bytes_compressed=program_weight_bytes(compressed_program, 64),
        weights=errors,
        end_to_end_rel_error=(num / den) ** 0.5 if den else num**0.5,
        end_to_end_max_abs=max(float((a - b).abs().max()) for a, b in zip(cand_out, ref_out, strict=True)),
        fp16_rel_error=(f16 / den32) ** 0.5 if den32 else f16**0.5,
        kept_fp16={w.const: w.reason for w in weights if w.scheme == "fp16"},
    )


def overrides_for(swap: WeightSwap, weights, values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """FX node → torch tensor (the node's dtype) from MIL const values."""
    out = {}
    for w in weights:
        val = swap.nodes[w.node].meta.get("val")
        dtype = val.dtype if val is not None else torch.float32
        out[w.node] = torch.from_numpy(np.asarray(values[w.const], dtype=np.float32)).to(dtype).reshape(w.shape)
    return out


def _consumer(swap: WeightSwap, node: str) -> str | None:
    """The first op that computes with the weight (skipping views of it)."""
    n = swap.nodes[node]
    for _ in range(8):
        users = list(n.users)
        if not users:
            return None
        u = users[0]
        if u.op == "call_function" and "view" not in str(u.target) and "reshape" not in str(u.target):
            return u.name
        n = u
    return None


# ---------------------------------------------------------------------------------------------
# Language models: next-token agreement and KL over a fixed prompt set
# ---------------------------------------------------------------------------------------------

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids (1, T) → logits (T, V) for every position


def greedy_continuations(logits_fn: LogitsFn, prompts: Sequence[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Each prompt extended greedily by ``new_tokens`` tokens (reference sequences)."""
    out = []
    for ids in prompts:
        seq = ids.reshape(1, -1)
        for _ in range(new_tokens):
            nxt = logits_fn(seq)[-1].argmax()
            seq = torch.cat([seq, nxt.reshape(1, 1)], dim=1)
        out.append(seq)
    return out


def lm_agreement(
    reference: LogitsFn, candidate: LogitsFn, sequences: Sequence[torch.Tensor], prompt_lengths: Sequence[int]
) -> LMQuality:
    """Teacher-forced next-token agreement and mean KL(reference ‖ candidate) on the positions that
    predict each sequence's continuation (``sequences[i][prompt_lengths[i]:]``)."""
    agree = total = 0
    kls: list[torch.Tensor] = []
    first: list[int | None] = []
    for seq, p in zip(sequences, prompt_lengths, strict=True):
        seq = seq.reshape(1, -1)
        n = seq.shape[1] - p
        if n <= 0:
            raise ValueError(f"sequence of {seq.shape[1]} tokens has no continuation after its {p}-token prompt")
        lr = reference(seq)[p - 1 : p - 1 + n].double()
        lc = candidate(seq)[p - 1 : p - 1 + n].double()
        same = lr.argmax(-1) == lc.argmax(-1)
        agree += int(same.sum())
        total += n
        miss = (~same).nonzero()
        first.append(int(miss[0]) if len(miss) else None)
        logp, logq = torch.log_softmax(lr, -1), torch.log_softmax(lc, -1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
    kl = torch.cat(kls)
    return LMQuality(
        agreement=agree / total,
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        tokens=total,
        prompts=len(sequences),
        first_disagreement=first,
    )


def lm_quality(
    logits: Callable[[str], LogitsFn],
    prompts: Sequence[torch.Tensor],
    new_tokens: int,
    sequences: Sequence[torch.Tensor] | None = None,
) -> LMQuality:
    """The one quality measurement of a compressed language model, whichever front end made it:
    ``logits(variant)`` runs the shipped program with the ``"fp16"`` or the ``"compressed"`` weights
    (``ids → logits``); each prompt is continued greedily by the fp16 weights (or ``sequences`` —
    prompt + continuation — are given), then both score every continuation token teacher forced:
    greedy-token agreement and mean KL (:func:`lm_agreement`)."""
    reference, candidate = logits("fp16"), logits("compressed")
    if sequences is None:
        sequences = greedy_continuations(reference, prompts, new_tokens)
    return lm_agreement(reference, candidate, sequences, [p.shape[-1] for p in prompts])


def padded_logits_fn(run: Callable[[torch.Tensor], torch.Tensor], length: int, pad_id: int = 0) -> LogitsFn:
    """A full-sequence forward compiled for ``length`` tokens as an ``ids → logits`` callable: the ids
    are right-padded to ``length`` (exact for causal models: no position attends to a later one)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[-1]
        if t > length:
            raise ValueError(f"{t} tokens do not fit the {length} the model was compiled for")
        padded = torch.full((1, length), pad_id, dtype=ids.dtype)
        padded[0, :t] = ids.reshape(-1)
        logits = run(padded)
        return logits.reshape(length, -1)[:t]

    return fn
