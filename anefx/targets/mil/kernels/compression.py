"""Compressed weights and quantization: the ``constexpr_*`` ops (iOS16, iOS18) and ``quantize`` /
``dequantize`` (iOS17).

Semantics as coremltools' ``mil/ops/defs/iOS16/constexpr_ops.py``, ``iOS18/compression.py`` and
``iOS17/quantization_ops.py`` (their ``materialized_val_inference`` / ``decompress`` and
``coremltools.optimize._utils``). The interpreter evaluates these once, when it prepares a function
(their inputs are constants), so a decode step never decompresses a weight again.
"""

from __future__ import annotations

import math

import torch

from anefx.targets.mil.kernels.base import Args, axis_of, to_int, to_ints


def _unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """``count`` ``nbits``-bit unsigned values packed from the least significant bit up (iOS16)."""
    bits = (packed.to(torch.int64).reshape(-1, 1) >> torch.arange(8)) & 1
    bits = bits.reshape(-1)[: count * nbits].reshape(count, nbits)
    return (bits << torch.arange(nbits)).sum(dim=1)


def _promote(param: torch.Tensor, rank: int, axis: int | None) -> torch.Tensor:
    """A scale or zero point of rank 0, 1 (along ``axis``) or ``rank``, shaped to broadcast."""
    if param.dim() in (0, rank):
        return param
    shape = [1] * rank
    shape[axis_of(axis if axis is not None else 0, rank)] = -1
    return param.reshape(shape)


def _blockwise(param: torch.Tensor, shape) -> torch.Tensor:
    """``param`` (same rank as the data, each size dividing the data's) repeated over its blocks."""
    if param.dim() != len(shape):
        return param
    expanded = param.reshape([d for s in param.shape for d in (s, 1)])
    expanded = expanded.expand([d for p, n in zip(param.shape, shape) for d in (p, n // p)])
    return expanded.reshape(shape)


def constexpr_affine_dequantize(a: Args):
    q = a.quantized_data.to(torch.float32)
    axis = to_int(a.axis, 0)
    return (q - _promote(a.zero_point.to(torch.float32), q.dim(), axis)) * _promote(a.scale, q.dim(), axis)


def constexpr_cast(a: Args):
    return a.source_val  # the interpreter converts to ``output_dtype`` (fp16 → fp32: exact)


def constexpr_blockwise_shift_scale(a: Args):
    data = a.data.to(torch.float32)
    if a.offset is not None:
        data = data - _blockwise(a.offset.to(torch.float32), data.shape)
    return data * _blockwise(a.scale, data.shape)


def _lut_to_dense(indices: torch.Tensor, lut: torch.Tensor, vector_axis: int | None) -> torch.Tensor:
    """iOS18: ``lut`` is ``(*blocks, palette, vector)``; each block of ``indices`` uses its own table."""
    indices = indices.to(torch.int64)
    palette, vector = lut.shape[-2], lut.shape[-1]
    if vector > 1:
        vector_axis = axis_of(vector_axis, indices.dim())
        indices = indices.transpose(-1, vector_axis)
        lut = lut.transpose(-3, vector_axis)
    blocks = lut.shape[:-2]
    flat_block = torch.zeros((), dtype=torch.int64)
    for axis, (n, b) in enumerate(zip(indices.shape, blocks)):
        coord = torch.arange(n) // (n // b)
        flat_block = flat_block * b + coord.reshape([-1 if i == axis else 1 for i in range(indices.dim())])
    table = lut.reshape(-1, vector)
    out = table[flat_block * palette + indices]  # (*indices.shape, vector)
    if vector > 1:
        out = out.reshape(*indices.shape[:-1], indices.shape[-1] * vector)
        return out.transpose(-1, vector_axis)
    return out.squeeze(-1)


def constexpr_lut_to_dense(a: Args):
    if a.shape is not None:  # iOS16: one flat table, indices packed into bytes
        shape = to_ints(a.shape)
        lut = a.lut.reshape(-1)
        indices = _unpack_bits(a.indices, int(math.log2(lut.numel())), math.prod(shape))
        return lut[indices].reshape(shape)
    return _lut_to_dense(a.indices, a.lut, to_int(a.vector_axis))


def _sparse_to_dense(nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=nonzero.dtype)
    out[mask != 0] = nonzero
    return out


def constexpr_sparse_to_dense(a: Args):
    if a.shape is not None:  # iOS16: the mask is bits packed into bytes
        shape = to_ints(a.shape)
        mask = _unpack_bits(a.mask, 1, math.prod(shape)).reshape(shape)
        return _sparse_to_dense(a.nonzero_data, mask)
    return _sparse_to_dense(a.nonzero_data, a.mask)


def constexpr_lut_to_sparse(a: Args):
    """Palettized non-zero values: (mask of the output, its non-zero values)."""
    indices = _sparse_to_dense(a.indices_nonzero_data, a.indices_mask)
    vector_axis = to_int(a.vector_axis)
    dense = _lut_to_dense(indices, a.lut, vector_axis)
    mask = a.indices_mask
    if a.lut.shape[-1] > 1:
        mask = mask.repeat_interleave(a.lut.shape[-1], dim=axis_of(vector_axis, mask.dim()))
    return mask, dense[mask != 0].reshape(-1)


def constexpr_sparse_blockwise_shift_scale(a: Args):
    data = _sparse_to_dense(a.nonzero_data.to(torch.float32), a.data_mask)
    if a.offset is not None:
        data = data - _blockwise(a.offset.to(torch.float32), data.shape)
    data = data * _blockwise(a.scale, data.shape)
    return a.data_mask, data[a.data_mask != 0].reshape(-1)


_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15), "int16": (-32768, 32767)}


def quantize(a: Args):
    x = a.input
    axis = to_int(a.axis)
    q = torch.round(x / _promote(a.scale, x.dim(), axis))  # half to even, as numpy's around
    if a.zero_point is not None:
        q = q + _promote(a.zero_point.to(torch.float32), x.dim(), axis)
    low, high = _RANGES[a.output_dtype]
    return torch.clamp(q, low, high)


def dequantize(a: Args):
    x = a.input.to(torch.float32)
    axis = to_int(a.axis)
    if a.zero_point is not None:
        x = x - _promote(a.zero_point.to(torch.float32), x.dim(), axis)
    return x * _promote(a.scale, x.dim(), axis)


KERNELS = {
    "constexpr_affine_dequantize": constexpr_affine_dequantize,
    "constexpr_cast": constexpr_cast,
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": constexpr_lut_to_dense,
    "constexpr_sparse_to_dense": constexpr_sparse_to_dense,
    "constexpr_lut_to_sparse": constexpr_lut_to_sparse,
    "constexpr_sparse_blockwise_shift_scale": constexpr_sparse_blockwise_shift_scale,
    "quantize": quantize,
    "dequantize": dequantize,
}
