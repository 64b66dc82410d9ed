"""anefx's own torch ops: normalisation over the channel axis of a (B, C, 1, S) tensor, and over
the last two axes of a 4-D tensor (GroupNorm's ANE form), and the write of a KV cache's column at a
run-time position.

``aten.layer_norm`` normalises trailing axes only, so LayerNorm over axis 1 has no ATen spelling
of its own; spelled with reductions, whether coremltools fuses it back into one ``layer_norm``
depends on the values of the weights and on the order of an op's users. ``anefx::channel_layer_norm``
is one op instead, and each target lowers it for itself:

* in PyTorch (validation, the compiled graph) it runs ``F.layer_norm`` on the channel axis;
* for Core ML, :mod:`anefx.targets.coreml` registers a converter (at conversion time) that emits one
  MIL ``layer_norm`` over ``axes=[1]``;
* for Core AI and anything else, :data:`DECOMPOSITIONS` spells it with ATen reductions over axis 1
  (``ExportedProgram.run_decompositions`` takes it with the target's own table).

Numerics are those of ``nn.LayerNorm``: biased variance, ``eps`` added to the variance.

``anefx::instance_norm_4d`` normalises each (b, c) row of a 4-D tensor over its last two axes, with no
weights: GroupNorm on (B, C, H, W) is this op on the view (B, G, C/G·H, W) (a reshape that keeps the
last axis), then the per-channel weight and bias. Core ML gets one MIL ``instance_norm``; Core AI
and others get reductions over axes 2 and 3 (:data:`DECOMPOSITIONS`).

``anefx::cache_write(cache, update, position, axis)`` writes ``update`` into ``cache`` at the slot
``position`` holds (a run-time value) along ``axis``. ATen can spell it only as ``index_copy``, which
coremltools does not convert; Core ML lowers it to one MIL ``slice_update`` (which, on a state, writes
one column in place), the others to ``index_copy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


@torch.library.custom_op("anefx::channel_layer_norm", mutates_args=())
def channel_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over axis 1 of ``x`` (rank ≥ 2), with per-channel ``weight`` and ``bias`` of shape (C,)."""
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps)
    return y.movedim(-1, 1).contiguous()


@channel_layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def decompose_channel_layer_norm(x, weight, bias, eps):
    """``channel_layer_norm`` with ATen reductions over axis 1 (same eps, biased variance)."""
    mean = aten.mean.dim(x, [1], True)
    zm = aten.sub.Tensor(x, mean)
    var = aten.mean.dim(aten.mul.Tensor(zm, zm), [1], True)
    out = aten.mul.Tensor(zm, aten.rsqrt.default(aten.add.Tensor(var, eps)))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if weight is not None:
        out = aten.mul.Tensor(out, aten.view.default(weight, shape))
    if bias is not None:
        out = aten.add.Tensor(out, aten.view.default(bias, shape))
    return out


@torch.library.custom_op("anefx::instance_norm_4d", mutates_args=())
def instance_norm_4d(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each (b, c) of the 4-D ``x`` normalised over axes 2 and 3 (biased variance, ``eps`` added)."""
    return F.instance_norm(x, eps=eps).contiguous()


@instance_norm_4d.register_fake
def _(x, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def decompose_instance_norm(x, eps):
    """``instance_norm`` with ATen reductions over axes 2 and 3."""
    mean = aten.mean.dim(x, [2, 3], True)
    zm = aten.sub.Tensor(x, mean)
    var = aten.mean.dim(aten.mul.Tensor(zm, zm), [2, 3], True)
    return aten.mul.Tensor(zm, aten.rsqrt.default(aten.add.Tensor(var, eps)))


@torch.library.custom_op("anefx::cache_write", mutates_args=())
def cache_write(cache: torch.Tensor, update: torch.Tensor, position: torch.Tensor, axis: int) -> torch.Tensor:
    """``cache`` with ``update`` written along ``axis`` at slots ``p, p + 1, …``, ``p`` the first element
    of the integer tensor ``position``: the write of a KV cache's new column. Slots outside the
    cache are not written here; a target's lowering may assume they never occur (Core ML: one
    ``slice_update`` at run-time indices)."""
    n = update.shape[axis]
    slots = position.reshape(-1)[:1].long() + torch.arange(n, device=cache.device)
    keep = (slots >= 0) & (slots < cache.shape[axis])
    out = cache.clone()
    return out.index_copy_(axis, slots[keep], update.index_select(axis, keep.nonzero().reshape(-1)))


@cache_write.register_fake
def _(cache, update, position, axis):
    return torch.empty_like(cache)


def decompose_cache_write(cache, update, position, axis):
    """``cache_write`` as one ATen ``index_copy`` at ``p + arange(n)`` (slots assumed in range)."""
    n = update.shape[axis]
    start = aten.view.default(aten.slice.Tensor(aten.view.default(position, [-1]), 0, 0, 1), [1])
    slots = aten.add.Tensor(aten.arange.default(n, dtype=torch.long), aten._to_copy.default(start, dtype=torch.long))
    return aten.index_copy.default(cache, axis, slots, update)


#: ATen decompositions of anefx's ops, for ``ExportedProgram.run_decompositions``.
DECOMPOSITIONS = {
    torch.ops.anefx.channel_layer_norm.default: decompose_channel_layer_norm,
    torch.ops.anefx.instance_norm_4d.default: decompose_instance_norm,
    torch.ops.anefx.cache_write.default: decompose_cache_write,
}
