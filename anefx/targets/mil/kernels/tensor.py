"""Tensor MIL ops: shapes and layout, slicing, gathers and scatters, reductions, and the tensor utilities.

Semantics as coremltools' ``mil/ops/defs/iOS15/tensor_transformation.py``, ``tensor_operation.py``,
``scatter_gather.py`` and ``reduction.py``, with the additions of their iOS16 … iOS18 versions
(``gather``'s ``batch_dims`` and negative indices, ``topk``'s ``sort`` / ``return_indices``,
``slice_update``). Indices are taken modulo the axis length where MIL allows negative indices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anefx.targets.mil.kernels.base import Args, axis_of, to_bool, to_float, to_int, to_ints

INT32_MAX = 2**31 - 1

# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


def reshape(a: Args):
    x, shape = a.x, to_ints(a.shape)
    if len(shape) == x.dim():
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 keeps the input's size
    return x.reshape(shape)


def transpose(a: Args):
    return a.x.permute(to_ints(a.perm))


def expand_dims(a: Args):
    x, axes = a.x, to_ints(a.axes)
    rank = x.dim() + len(axes)
    for axis in sorted(axis_of(ax, rank) for ax in axes):
        x = x.unsqueeze(axis)
    return x


def squeeze(a: Args):
    x = a.x
    if a.axes is None:
        return x.reshape([s for s in x.shape if s != 1])
    axes = {axis_of(ax, x.dim()) for ax in to_ints(a.axes)}
    return x.reshape([s for i, s in enumerate(x.shape) if i not in axes])


def flatten2d(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def reverse(a: Args):
    x = a.x
    axes = list(range(x.dim())) if a.axes is None else [axis_of(ax, x.dim()) for ax in to_ints(a.axes)]
    return torch.flip(x, axes)


def reverse_sequence(a: Args):
    x, lengths = a.x, to_ints(a.lengths)
    seq, batch = axis_of(to_int(a.seq_axis, 0), x.dim()), axis_of(to_int(a.batch_axis, 0), x.dim())
    out = x.clone()
    for b, n in enumerate(lengths):
        part = x.select(batch, b)
        axis = seq if seq < batch else seq - 1
        flipped = torch.flip(part.narrow(axis, 0, n), [axis])
        out.select(batch, b).narrow(axis, 0, n).copy_(flipped)
    return out


def tile(a: Args):
    return torch.tile(a.x, to_ints(a.reps))


def concat(a: Args):
    values, axis = list(a.values), to_int(a.axis)
    if to_bool(a.interleave):
        axis = axis_of(axis, values[0].dim())
        stacked = torch.stack(values, dim=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return torch.cat(values, dim=axis)


def stack(a: Args):
    return torch.stack(list(a.values), dim=to_int(a.axis))


def split(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis), x.dim())
    if a.split_sizes is not None:
        sizes = to_ints(a.split_sizes)
    else:
        n = to_int(a.num_splits)
        sizes = [x.shape[axis] // n] * n
    return tuple(torch.split(x, sizes, dim=axis))


def depth_to_space(a: Args):
    """(n, C·b², H, W) → (n, C, H·b, W·b), channels in depth-column-row order (TensorFlow's)."""
    x, b = a.x, to_int(a.block_size)
    n, c, h, w = x.shape
    return x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(a: Args):
    x, b = a.x, to_int(a.block_size)
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def pixel_shuffle(a: Args):
    return F.pixel_shuffle(a.x, to_int(a.upscale_factor))


def pixel_unshuffle(a: Args):
    return F.pixel_unshuffle(a.x, to_int(a.downscale_factor))


def sliding_windows(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis), x.dim())
    windows = x.unfold(axis, to_int(a.size), to_int(a.stride, 1))  # window elements on the last axis
    return windows.movedim(-1, axis + 1)


def shape(a: Args):
    return torch.tensor(list(a.x.shape), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# slicing
# ---------------------------------------------------------------------------------------------


def _slices(shape, a: Args) -> tuple[list[range], list[int]]:
    """Per axis, the indices ``slice_by_index``'s parameters select (Python slice rules, as
    coremltools' ``solve_slice_by_index_slice``), and the axes ``squeeze_mask`` removes."""
    rank = len(shape)
    begin, end = to_ints(a.begin), to_ints(a.end)
    stride = to_ints(a.stride) or [1] * rank
    begin_mask = to_ints(a.begin_mask) or [0] * rank
    end_mask = to_ints(a.end_mask) or [0] * rank
    squeeze_mask = to_ints(a.squeeze_mask) or [0] * rank
    ranges, squeezed = [], []
    for i in range(rank):
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        s = stride[i]
        if squeeze_mask[i]:
            e, s = None, INT32_MAX  # one element, at ``begin``
            squeezed.append(i)
        ranges.append(range(*slice(b, e, s).indices(shape[i])))
    return ranges, squeezed


def _index(ranges: list[range]) -> tuple:
    """An index for ``ranges``: basic slices when every step is positive, else index arrays."""
    if all(r.step > 0 for r in ranges):
        return tuple(slice(r.start, r.start if not len(r) else r[-1] + 1, r.step) for r in ranges)
    grids = torch.meshgrid(*[torch.tensor(list(r), dtype=torch.long) for r in ranges], indexing="ij")
    return tuple(grids)


def slice_by_index(a: Args):
    ranges, squeezed = _slices(a.x.shape, a)
    out = a.x[_index(ranges)]
    return out.reshape([s for i, s in enumerate(out.shape) if i not in squeezed])


def slice_by_size(a: Args):
    x, begin, size = a.x, to_ints(a.begin), to_ints(a.size)
    for axis, (b, n) in enumerate(zip(begin, size)):
        b = axis_of(b, x.shape[axis])
        x = x.narrow(axis, b, x.shape[axis] - b if n == -1 else n)
    return x


def slice_update(a: Args):
    x = a.x
    ranges, _ = _slices(x.shape, a)
    out = x.clone()
    out[_index(ranges)] = a.update.reshape([len(r) for r in ranges]).to(x.dtype)
    return out


def crop(a: Args):
    x = a.x
    top, bottom = to_ints(a.crop_height)
    left, right = to_ints(a.crop_width)
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


# ---------------------------------------------------------------------------------------------
# gathers and scatters
# ---------------------------------------------------------------------------------------------


def _wrap(indices: torch.Tensor, size: int) -> torch.Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


def _gather(x: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    idx = _wrap(indices, x.shape[axis])
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def gather(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, 0), x.dim())
    batch = to_int(a.batch_dims, 0)
    if batch == 0:
        return _gather(x, a.indices, axis)
    lead = x.shape[:batch]
    xs, idx = x.reshape(-1, *x.shape[batch:]), a.indices.reshape(-1, *a.indices.shape[batch:])
    parts = [_gather(xs[i], idx[i], axis - batch) for i in range(xs.shape[0])]
    return torch.stack(parts).reshape(*lead, *parts[0].shape)


def gather_along_axis(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, 0), x.dim())
    return torch.gather(x, axis, _wrap(a.indices, x.shape[axis]))


def _gather_nd(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    idx = torch.stack([_wrap(idx[:, i], x.shape[i]) for i in range(k)])
    return x[tuple(idx)].reshape(*indices.shape[:-1], *x.shape[k:])


def gather_nd(a: Args):
    x, indices = a.x, a.indices
    batch = to_int(a.batch_dims, 0)
    if batch == 0:
        return _gather_nd(x, indices)
    lead = x.shape[:batch]
    xs, idx = x.reshape(-1, *x.shape[batch:]), indices.reshape(-1, *indices.shape[batch:])
    parts = [_gather_nd(xs[i], idx[i]) for i in range(xs.shape[0])]
    return torch.stack(parts).reshape(*lead, *parts[0].shape)


_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


def scatter(a: Args):
    """``data`` with rows ``indices`` (1-D) along ``axis`` combined with ``updates`` by ``mode``."""
    data = a.data
    axis = axis_of(to_int(a.axis, 0), data.dim())
    out = data.movedim(axis, 0).clone()
    updates = a.updates.movedim(axis, 0).to(out.dtype)
    idx = _wrap(a.indices.reshape(-1), out.shape[0])
    updates = updates.reshape(idx.shape[0], *out.shape[1:])
    mode = a.mode or "add"
    if mode == "update":
        out[idx] = updates
    elif mode in ("add", "sub"):
        out.index_add_(0, idx, updates if mode == "add" else -updates)
    elif mode == "div":
        out.index_reduce_(0, idx, 1 / updates, "prod")
    else:
        out.index_reduce_(0, idx, updates, _REDUCE[mode])
    return out.movedim(0, axis)


def scatter_along_axis(a: Args):
    data = a.data
    axis = axis_of(to_int(a.axis, 0), data.dim())
    idx = _wrap(a.indices, data.shape[axis])
    updates = a.updates.to(data.dtype)
    mode = a.mode or "add"
    if mode == "update":
        return data.scatter(axis, idx, updates)
    if mode in ("add", "sub"):
        return data.scatter_add(axis, idx, updates if mode == "add" else -updates)
    if mode == "div":
        return data.scatter_reduce(axis, idx, 1 / updates, "prod")
    return data.scatter_reduce(axis, idx, updates, _REDUCE[mode])


def scatter_nd(a: Args):
    data, indices = a.data, a.indices
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    idx = tuple(_wrap(idx[:, i], data.shape[i]) for i in range(k))
    updates = a.updates.reshape(idx[0].shape[0], *data.shape[k:]).to(data.dtype)
    out = data.clone()
    mode = a.mode or "add"
    if mode == "update":
        out[idx] = updates
    elif mode in ("add", "sub"):
        out.index_put_(idx, updates if mode == "add" else -updates, accumulate=True)
    else:
        for j in range(updates.shape[0]):
            at = tuple(i[j] for i in idx)
            u = updates[j]
            out[at] = {"mul": out[at] * u, "div": out[at] / u, "max": torch.maximum(out[at], u)}.get(
                mode, torch.minimum(out[at], u)
            )
    return out


def select(a: Args):
    return torch.where(a.cond.bool(), a.a, a.b)


def non_zero(a: Args):
    return torch.nonzero(a.x).to(torch.int32)


def one_hot(a: Args):
    indices, size = a.indices.long(), to_int(a.one_hot_vector_size)
    axis = axis_of(to_int(a.axis, -1), indices.dim() + 1)
    hot = (indices.unsqueeze(-1) == torch.arange(size)).movedim(-1, axis)
    on, off = to_float(a.on_value, 1.0), to_float(a.off_value, 0.0)
    return torch.where(hot, torch.tensor(on), torch.tensor(off))


def band_part(a: Args):
    x = a.x
    lower, upper = to_int(a.lower, -1), to_int(a.upper, -1)
    m, n = x.shape[-2:]
    rows, cols = torch.arange(m).unsqueeze(1), torch.arange(n).unsqueeze(0)
    keep = torch.ones(m, n, dtype=torch.bool)
    if lower >= 0:
        keep &= (rows - cols) <= lower
    if upper >= 0:
        keep &= (cols - rows) <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


def cumsum(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, 0), x.dim())
    if to_bool(a.reverse):
        x = torch.flip(x, [axis])
    out = torch.cumsum(x, dim=axis)
    if to_bool(a.exclusive):
        out = out - x
    if to_bool(a.reverse):
        out = torch.flip(out, [axis])
    return out


def fill(a: Args):
    value = a.value if a.value is not None else torch.tensor(0.0)
    return torch.full(to_ints(a.shape), value.item(), dtype=value.dtype)


def fill_like(a: Args):
    value = a.value if a.value is not None else torch.tensor(0.0)
    return torch.full(tuple(a.ref_tensor.shape), value.item(), dtype=value.dtype)


def range_1d(a: Args):
    start, end, step = a.start, a.end, a.step
    if start.is_floating_point() or end.is_floating_point() or step.is_floating_point():
        return torch.arange(float(start), float(end), float(step))
    return torch.arange(int(start), int(end), int(step), dtype=torch.int32)


def pad(a: Args):
    """``pad`` lists (before, after) for the last ``len(pad) / 2`` axes, first axis first."""
    x = a.x
    amounts = to_ints(a.pad)
    mode = a.mode or "constant"
    n = len(amounts) // 2
    if mode == "constant":
        flat = []
        for i in reversed(range(n)):
            flat += [amounts[2 * i], amounts[2 * i + 1]]
        return F.pad(x, flat, value=to_float(a.constant_val, 0.0))
    for i in range(n):
        axis = x.dim() - n + i
        before, after = amounts[2 * i], amounts[2 * i + 1]
        size = x.shape[axis]
        idx = torch.arange(-before, size + after)
        if mode == "reflect":
            period = 2 * (size - 1)
            idx = idx.remainder(period)
            idx = torch.where(idx >= size, period - idx, idx)
        else:  # replicate
            idx = idx.clamp(0, size - 1)
        x = x.index_select(axis, idx)
    return x


# ---------------------------------------------------------------------------------------------
# reductions, sorting
# ---------------------------------------------------------------------------------------------


def _axes(a: Args, x: torch.Tensor) -> list[int]:
    return list(range(x.dim())) if a.axes is None else [axis_of(ax, x.dim()) for ax in to_ints(a.axes)]


def _reduction(fn):
    def kernel(a: Args):
        x = a.x
        axes = _axes(a, x)
        out = fn(x, axes)
        keep = to_bool(a.keep_dims)
        if keep:
            return out
        return out.reshape([s for i, s in enumerate(x.shape) if i not in axes])

    return kernel


def _prod(x, axes):
    for axis in axes:
        x = torch.prod(x, dim=axis, keepdim=True)
    return x


REDUCTIONS = {
    "reduce_sum": lambda x, axes: torch.sum(x, dim=axes, keepdim=True),
    "reduce_mean": lambda x, axes: torch.mean(x, dim=axes, keepdim=True),
    "reduce_max": lambda x, axes: torch.amax(x, dim=axes, keepdim=True),
    "reduce_min": lambda x, axes: torch.amin(x, dim=axes, keepdim=True),
    "reduce_prod": _prod,
    "reduce_l1_norm": lambda x, axes: torch.sum(x.abs(), dim=axes, keepdim=True),
    "reduce_l2_norm": lambda x, axes: torch.sqrt(torch.sum(x * x, dim=axes, keepdim=True)),
    "reduce_sum_square": lambda x, axes: torch.sum(x * x, dim=axes, keepdim=True),
    "reduce_log_sum": lambda x, axes: torch.log(torch.sum(x, dim=axes, keepdim=True)),
    "reduce_log_sum_exp": lambda x, axes: torch.logsumexp(x, dim=axes, keepdim=True),
}


def _arg(fn):
    def kernel(a: Args):
        x = a.x
        axis = axis_of(to_int(a.axis, -1), x.dim())
        return fn(x, dim=axis, keepdim=to_bool(a.keep_dims)).to(torch.int32)

    return kernel


def topk(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, -1), x.dim())
    values, indices = torch.topk(x, to_int(a.k, 1), dim=axis, largest=not to_bool(a.ascending), sorted=True)
    if a.return_indices is not None and not to_bool(a.return_indices):
        return values
    return values, indices


def argsort(a: Args):
    x = a.x
    axis = axis_of(to_int(a.axis, -1), x.dim())
    return torch.argsort(x, dim=axis, descending=not to_bool(a.ascending), stable=True).to(torch.int32)


KERNELS = {
    "reshape": reshape,
    "transpose": transpose,
    "expand_dims": expand_dims,
    "squeeze": squeeze,
    "flatten2d": flatten2d,
    "reverse": reverse,
    "reverse_sequence": reverse_sequence,
    "tile": tile,
    "concat": concat,
    "stack": stack,
    "split": split,
    "depth_to_space": depth_to_space,
    "space_to_depth": space_to_depth,
    "pixel_shuffle": pixel_shuffle,
    "pixel_unshuffle": pixel_unshuffle,
    "sliding_windows": sliding_windows,
    "shape": shape,
    "slice_by_index": slice_by_index,
    "slice_by_size": slice_by_size,
    "slice_update": slice_update,
    "crop": crop,
    "gather": gather,
    "gather_along_axis": gather_along_axis,
    "gather_nd": gather_nd,
    "scatter": scatter,
    "scatter_along_axis": scatter_along_axis,
    "scatter_nd": scatter_nd,
    "select": select,
    "non_zero": non_zero,
    "one_hot": one_hot,
    "band_part": band_part,
    "cumsum": cumsum,
    "fill": fill,
    "fill_like": fill_like,
    "range_1d": range_1d,
    "pad": pad,
    **{name: _reduction(fn) for name, fn in REDUCTIONS.items()},
    "reduce_argmax": _arg(torch.argmax),
    "reduce_argmin": _arg(torch.argmin),
    "topk": topk,
    "argsort": argsort,
}
