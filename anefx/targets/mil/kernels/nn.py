"""Neural-network MIL ops: convolutions, matrix products, normalizations, pooling, resampling, attention.

Semantics as coremltools' ``mil/ops/defs/iOS15/conv.py``, ``linear.py``, ``normalization.py``,
``pool.py``, ``image_resizing.py`` (iOS16/17 versions: ``upsample_bilinear``'s ``half_pixel_centers``)
and iOS18's ``transformers.py``. Padding follows coremltools' ``aggregated_pad``: ``custom`` lists
(before, after) per spatial axis; ``same`` puts the odd element after, ``same_lower`` before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anefx.targets.mil.kernels.base import Args, axis_of, channel_view, to_bool, to_float, to_int, to_ints

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _pads(a: Args, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """(before, after) per spatial axis, flattened: ``[b0, a0, b1, a1, …]``."""
    pad_type = a.pad_type or "valid"
    n = len(spatial)
    if pad_type == "custom":
        return to_ints(a.pad) or [0] * 2 * n
    if pad_type == "valid":
        return [0] * 2 * n
    out = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        effective = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + effective - s)
        before = total // 2 if pad_type == "same" else total - total // 2
        out += [before, total - before]
    return out


def _torch_pad(pads: list[int]) -> list[int]:
    """MIL's (before, after) per axis, first axis first → ``F.pad``'s order (last axis first)."""
    flat = []
    for i in reversed(range(len(pads) // 2)):
        flat += [pads[2 * i], pads[2 * i + 1]]
    return flat


def conv(a: Args):
    x, w = a.x, a.weight
    n = w.dim() - 2
    strides = to_ints(a.strides) or [1] * n
    dilations = to_ints(a.dilations) or [1] * n
    pads = _pads(a, list(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    if any(pads):
        x = F.pad(x, _torch_pad(pads))
    return _CONV[n](x, w, a.bias, stride=strides, dilation=dilations, groups=to_int(a.groups, 1))


def conv_transpose(a: Args):
    """Weight ``(C_in, C_out / groups, *K)``; padding removes rows from the full transposed output."""
    x, w = a.x, a.weight
    n = w.dim() - 2
    strides = to_ints(a.strides) or [1] * n
    dilations = to_ints(a.dilations) or [1] * n
    groups = to_int(a.groups, 1)
    full = _CONV_T[n](x, w, a.bias, stride=strides, dilation=dilations, groups=groups)
    pad_type = a.pad_type or "valid"
    sizes = list(full.shape[2:])
    if a.output_shape is not None:
        target = to_ints(a.output_shape)[-n:]
    elif pad_type in ("same", "same_lower"):
        target = [size * s for size, s in zip(x.shape[2:], strides)]
    else:
        pads = to_ints(a.pad) if pad_type == "custom" and a.pad is not None else [0] * 2 * n
        target = [size - pads[2 * i] - pads[2 * i + 1] for i, size in enumerate(sizes)]
    for i, (size, want) in enumerate(zip(sizes, target)):
        extra = size - want
        if pad_type == "custom" and a.pad is not None and a.output_shape is None:
            before = to_ints(a.pad)[2 * i]
        else:
            before = extra // 2 if pad_type != "same_lower" else extra - extra // 2
        full = full.narrow(2 + i, before, want)
    return full


def linear(a: Args):
    return F.linear(a.x, a.weight, a.bias)


def matmul(a: Args):
    x, y = a.x, a.y
    if to_bool(a.transpose_x) and x.dim() > 1:
        x = x.transpose(-1, -2)
    if to_bool(a.transpose_y) and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def einsum(a: Args):
    x, y = a.values
    return torch.einsum(a.equation, x, y)


def _normalize(x: torch.Tensor, axes: list[int], eps: float) -> torch.Tensor:
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def layer_norm(a: Args):
    """Normalizes over ``axes``; ``gamma`` and ``beta`` have the shape of those axes, in order."""
    x = a.x
    axes = list(range(x.dim())) if a.axes is None else sorted(axis_of(ax, x.dim()) for ax in to_ints(a.axes))
    y = _normalize(x, axes, to_float(a.epsilon, 1e-5))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.dim())]
    if a.gamma is not None:
        y = y * a.gamma.reshape(shape)
    if a.beta is not None:
        y = y + a.beta.reshape(shape)
    return y


def _channel_affine(y: torch.Tensor, a: Args) -> torch.Tensor:
    """``y · gamma + beta`` with per-channel (axis 1) ``gamma`` and ``beta``, each optional."""
    if a.gamma is not None:
        y = y * channel_view(a.gamma, y.dim())
    if a.beta is not None:
        y = y + channel_view(a.beta, y.dim())
    return y


def batch_norm(a: Args):
    x = a.x
    rank = x.dim()
    y = (x - channel_view(a.mean, rank)) / torch.sqrt(channel_view(a.variance, rank) + to_float(a.epsilon, 1e-5))
    return _channel_affine(y, a)


def instance_norm(a: Args):
    x = a.x
    return _channel_affine(_normalize(x, list(range(2, x.dim())), to_float(a.epsilon, 1e-5)), a)


def l2_norm(a: Args):
    """Divides by the L2 norm of the last three axes (of everything for rank 3), per leading index."""
    x = a.x
    flat = x.reshape(-1, math.prod(x.shape[-3:])) if x.dim() > 3 else x.reshape(1, -1)
    norm = torch.sqrt((flat * flat).sum(dim=1, keepdim=True) + to_float(a.epsilon, 1e-6))
    return (flat / norm).reshape(x.shape)


def local_response_norm(a: Args):
    """``x / (k + alpha / size · Σ x²)^beta`` over ``size`` neighbouring channels (axis 1)."""
    x = a.x
    return F.local_response_norm(
        x, to_int(a.size), alpha=to_float(a.alpha, 1e-4), beta=to_float(a.beta, 0.75), k=to_float(a.k, 1.0)
    )


def _pool(a: Args, fill: float):
    """``x`` padded for a pooling window; the kernel, strides and the pads (MIL order)."""
    x = a.x
    kernel = to_ints(a.kernel_sizes)
    n = len(kernel)
    strides = to_ints(a.strides) or [1] * n
    pads = _pads(a, list(x.shape[-n:]), kernel, strides, [1] * n)
    if to_bool(a.ceil_mode):  # extend the end so that the last, partial window exists
        for i, (size, k, s) in enumerate(zip(x.shape[-n:], kernel, strides)):
            total = pads[2 * i] + pads[2 * i + 1]
            out = math.floor((size + total - k + s - 1) / s + 1)
            if (out - 1) * s >= size + total / 2 and total > 0:
                out -= 1
            pads[2 * i + 1] += max(0, (out - 1) * s + k - (size + total))
    if any(pads):
        x = F.pad(x, _torch_pad(pads), value=fill)
    return x, kernel, strides, pads


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _window_sum(x: torch.Tensor, kernel: list[int], strides: list[int]) -> torch.Tensor:
    return _AVG[len(kernel)](x, kernel, strides) * math.prod(kernel)


def avg_pool(a: Args):
    x, kernel, strides, pads = _pool(a, 0.0)
    total = _window_sum(x, kernel, strides)
    if not to_bool(a.exclude_padding_from_average):
        return total / math.prod(kernel)
    ones = torch.ones((1,) * (a.x.dim() - len(kernel)) + tuple(a.x.shape[-len(kernel) :]), dtype=x.dtype)
    count = _window_sum(F.pad(ones, _torch_pad(pads)), kernel, strides)
    return total / count


def max_pool(a: Args):
    x, kernel, strides, _ = _pool(a, -math.inf)
    return _MAX[len(kernel)](x, kernel, strides)


def l2_pool(a: Args):
    x, kernel, strides, _ = _pool(a, 0.0)
    return torch.sqrt(_window_sum(x * x, kernel, strides))


def _lerp_axis(x: torch.Tensor, axis: int, grid: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at the (clamped) source coordinates ``grid``."""
    size = x.shape[axis]
    grid = grid.clamp(0, size - 1)
    lo = grid.floor().long()
    hi = (lo + 1).clamp(max=size - 1)
    frac = (grid - lo).reshape([-1 if i == axis % x.dim() else 1 for i in range(x.dim())])
    return x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac


def _grid(size_in: int, size_out: int, mode: str, scale: float | None = None) -> torch.Tensor:
    i = torch.arange(size_out, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            return torch.full((1,), (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0, dtype=torch.float64)
        return i * (size_in - 1) / (size_out - 1)
    if mode == "DEFAULT":
        if scale is not None:  # upsample by a scale factor: source = destination / scale
            return i / scale
        return i * (size_in - size_in / size_out) / max(size_out - 1, 1)
    if mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        return 0.5 * delta + i * delta
    spacing = size_in / size_out if scale is None else 1 / scale  # UNALIGN_CORNERS: half-pixel centres
    return i * spacing + 0.5 * spacing - 0.5


def _bilinear(x: torch.Tensor, out_h: int, out_w: int, mode: str, scales=(None, None)) -> torch.Tensor:
    h, w = x.shape[-2:]
    y = _lerp_axis(x.double(), x.dim() - 2, _grid(h, out_h, mode, scales[0]))
    return _lerp_axis(y, x.dim() - 1, _grid(w, out_w, mode, scales[1])).to(x.dtype)


def resize_bilinear(a: Args):
    return _bilinear(a.x, to_int(a.target_size_height, 1), to_int(a.target_size_width, 1), a.sampling_mode or "DEFAULT")


def upsample_bilinear(a: Args):
    x = a.x
    sh, sw = to_float(a.scale_factor_height, 1.0), to_float(a.scale_factor_width, 1.0)
    align = to_bool(a.align_corners, True)
    half = to_bool(a.half_pixel_centers, not align)
    mode = "ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else "DEFAULT")
    h, w = x.shape[-2:]
    return _bilinear(x, math.floor(h * sh), math.floor(w * sw), mode, (sh, sw))


def _nearest(x: torch.Tensor, out_h: int, out_w: int, scales: tuple[float, float]) -> torch.Tensor:
    h, w = x.shape[-2:]
    rows = (torch.arange(out_h, dtype=torch.float64) / scales[0]).floor().long().clamp(max=h - 1)
    cols = (torch.arange(out_w, dtype=torch.float64) / scales[1]).floor().long().clamp(max=w - 1)
    return x.index_select(x.dim() - 2, rows).index_select(x.dim() - 1, cols)


def upsample_nearest_neighbor(a: Args):
    x = a.x
    sh, sw = to_float(a.scale_factor_height, 1.0), to_float(a.scale_factor_width, 1.0)
    h, w = x.shape[-2:]
    return _nearest(x, math.floor(h * sh), math.floor(w * sw), (sh, sw))


def resize_nearest_neighbor(a: Args):
    x = a.x
    out_h, out_w = to_int(a.target_size_height), to_int(a.target_size_width)
    h, w = x.shape[-2:]
    return _nearest(x, out_h, out_w, (out_h / h, out_w / w))


def scaled_dot_product_attention(a: Args):
    q, k, v, mask = a.query, a.key, a.value, a.attn_mask
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


KERNELS = {
    "conv": conv,
    "conv_transpose": conv_transpose,
    "linear": linear,
    "matmul": matmul,
    "einsum": einsum,
    "layer_norm": layer_norm,
    "batch_norm": batch_norm,
    "instance_norm": instance_norm,
    "l2_norm": l2_norm,
    "local_response_norm": local_response_norm,
    "avg_pool": avg_pool,
    "max_pool": max_pool,
    "l2_pool": l2_pool,
    "resize_bilinear": resize_bilinear,
    "upsample_bilinear": upsample_bilinear,
    "upsample_nearest_neighbor": upsample_nearest_neighbor,
    "resize_nearest_neighbor": resize_nearest_neighbor,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}
