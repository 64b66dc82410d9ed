"""The MIL interpreter's kernels against coremltools' own op semantics.

For every op whose coremltools definition carries a ``value_inference`` (numpy) or, for compressed
weights, a ``materialized_val_inference``, a one-op program is built with coremltools' Builder on
random constant inputs (hypothesis draws shapes, values and parameters), and the interpreter's
result (planned and run as for any program: the op is evaluated by its kernel, the result cast to
the declared dtype) must equal coremltools' value. fp16 inputs are compared within one fp16 unit in
the last place; fp32 within float32 rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anefx.compat.coremltools import coremltools_module
from anefx.targets.mil.interpreter import Constants, plan_function, run_function
from anefx.targets.mil.reader import dtype_name

ct = coremltools_module()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function  # noqa: E402
from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry  # noqa: E402

F32, F16 = np.float32, np.float16


def _x(rng, shape, dtype=F32, low=-3.0, high=3.0):
    return rng.uniform(low, high, size=shape).astype(dtype)


def _shape(rng, rank=None, low=1, high=5):
    rank = rank if rank is not None else int(rng.integers(1, 5))
    return tuple(int(s) for s in rng.integers(low, high + 1, size=rank))


def _unary(low=-3.0, high=3.0):
    return lambda rng, dt: {"x": _x(rng, _shape(rng), dt, low, high)}


def _binary(low=-3.0, high=3.0, ints=False):
    def case(rng, dt):
        shape = _shape(rng)
        other = tuple(1 if rng.random() < 0.3 else s for s in shape)  # broadcasting
        if ints:
            return {
                "x": rng.integers(-9, 10, size=shape).astype(np.int32),
                "y": rng.integers(1, 6, size=other).astype(np.int32),
            }
        return {"x": _x(rng, shape, dt, low, high), "y": _x(rng, other, dt, low, high)}

    return case


def _compare(rng, dt):
    shape = _shape(rng)
    x = _x(rng, shape, dt)
    return {"x": x, "y": np.where(rng.random(shape) < 0.5, x, _x(rng, shape, dt))}  # some equal pairs


def _logical(rng, dt):
    shape = _shape(rng)
    return {"x": rng.random(shape) < 0.5, "y": rng.random(shape) < 0.5}


def _alpha(rng, dt, **extra):
    return {"x": _x(rng, _shape(rng), dt), "alpha": dt(rng.uniform(0.1, 2.0)), **extra}


def _alpha_beta(rng, dt):
    return {"x": _x(rng, _shape(rng), dt), "alpha": dt(rng.uniform(0.1, 2.0)), "beta": dt(rng.uniform(0.1, 2.0))}


def _axes(rng, rank):
    n = int(rng.integers(1, rank + 1))
    axes = sorted(rng.choice(rank, size=n, replace=False).tolist())
    return [a - rank if rng.random() < 0.3 else a for a in axes]


def _reduce(rng, dt, positive=False):
    shape = _shape(rng)
    low = 0.5 if positive else -3.0
    return {"x": _x(rng, shape, dt, low, 3.0), "axes": _axes(rng, len(shape)), "keep_dims": bool(rng.random() < 0.5)}


def _arg(rng, dt):
    shape = _shape(rng)
    return {
        "x": _x(rng, shape, dt),
        "axis": int(rng.integers(-len(shape), len(shape))),
        "keep_dims": bool(rng.random() < 0.5),
    }


def _slice_by_index(rng, dt, update=False):
    shape = _shape(rng, rank=int(rng.integers(1, 4)), low=2, high=6)
    begin, end, stride, bm, em, sm = [], [], [], [], [], []
    for s in shape:
        step = int(rng.choice([1, 1, 2, -1]))
        b, e = sorted(int(v) for v in rng.integers(0, s + 1, size=2))
        if step < 0:
            b, e = max(e - 1, 0), b - 1
        squeeze = rng.random() < 0.2 and step == 1
        begin.append(b), end.append(e if e >= 0 else -s - 1), stride.append(step)
        bm.append(bool(rng.random() < 0.2)), em.append(bool(rng.random() < 0.2)), sm.append(bool(squeeze))
    case = {"x": _x(rng, shape, dt), "begin": np.array(begin, np.int32), "end": np.array(end, np.int32)}
    case |= {"stride": np.array(stride, np.int32), "begin_mask": bm, "end_mask": em, "squeeze_mask": sm}
    return case


def _pad(rng, dt):
    shape = _shape(rng, rank=int(rng.integers(1, 4)), low=2, high=5)
    mode = str(rng.choice(["constant", "reflect", "replicate"]))
    n = int(rng.integers(1, len(shape) + 1))
    amounts = [int(rng.integers(0, 2 if mode == "reflect" else 3)) for _ in range(2 * n)]
    case = {"x": _x(rng, shape, dt), "pad": np.array(amounts, np.int32), "mode": mode}
    if mode == "constant":
        case["constant_val"] = dt(rng.uniform(-2, 2))
    return case


def _gather(rng, dt):
    shape = _shape(rng, low=2)
    axis = int(rng.integers(-len(shape), len(shape)))
    size = shape[axis]
    indices = rng.integers(-size, size, size=_shape(rng, rank=int(rng.integers(1, 3)))).astype(np.int32)
    return {"x": _x(rng, shape, dt), "indices": indices, "axis": axis}


def _along_axis(rng, dt, scatter=False):
    shape = _shape(rng, low=2)
    axis = int(rng.integers(-len(shape), len(shape)))
    idx_shape = list(shape)
    idx_shape[axis] = int(rng.integers(1, shape[axis] + 1))
    if scatter:  # distinct positions along the axis: "update" is then order-independent
        order = np.argsort(rng.random(shape), axis=axis)
        indices = np.take(order, np.arange(idx_shape[axis]), axis=axis).astype(np.int32)
        data, updates = _x(rng, shape, dt), _x(rng, tuple(idx_shape), dt)
        # coremltools' value_inference is np.put_along_axis, i.e. mode "update", whatever the mode says
        return {"data": data, "indices": indices, "updates": updates, "axis": axis, "mode": "update"}
    indices = rng.integers(-shape[axis], shape[axis], size=idx_shape).astype(np.int32)
    return {"x": _x(rng, shape, dt), "indices": indices, "axis": axis}


def _layer_norm(rng, dt):
    shape = _shape(rng, low=2)
    axes = _axes(rng, len(shape))
    normalized = [shape[a] for a in sorted(a % len(shape) for a in axes)]
    return {
        "x": _x(rng, shape, dt),
        "axes": axes,
        "gamma": _x(rng, normalized, dt, 0.5, 1.5),
        "beta": _x(rng, normalized, dt),
        "epsilon": dt(1e-5),
    }


def _einsum(rng, dt):
    b, c, h, w1, w2 = (int(v) for v in rng.integers(1, 5, size=5))
    hx, hy = (h, 1) if rng.random() < 0.3 else (h, h)
    x, y = _x(rng, (b, c, hx, w1), dt), _x(rng, (b, w1, hy, w2), dt)
    return {"values": (x, y), "equation": "bchk,bkhq->bchq"}


def _matmul(rng, dt):
    m, k, n = (int(v) for v in rng.integers(1, 5, size=3))
    batch = _shape(rng, rank=int(rng.integers(0, 3)))
    tx, ty = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    x = _x(rng, (*batch, k, m) if tx else (*batch, m, k), dt)
    y = _x(rng, (k, n)[::-1] if ty else (k, n), dt)
    return {"x": x, "y": y, "transpose_x": tx, "transpose_y": ty}


def _sdpa(rng, dt):
    b, h, lq, lk, d = (int(v) for v in rng.integers(1, 5, size=5))
    case = {"query": _x(rng, (b, h, lq, d), dt), "key": _x(rng, (b, h, lk, d), dt), "value": _x(rng, (b, h, lk, d), dt)}
    if rng.random() < 0.5:
        case["attn_mask"] = _x(rng, (lq, lk), dt)
    return case


def _split(rng, dt):
    shape = _shape(rng, low=2, high=6)
    axis = int(rng.integers(0, len(shape)))
    size = shape[axis]
    if rng.random() < 0.5:
        n = next(d for d in (3, 2, 1) if size % d == 0)
        return {"x": _x(rng, shape, dt), "num_splits": n, "axis": axis}
    cut = int(rng.integers(1, size))
    return {"x": _x(rng, shape, dt), "split_sizes": np.array([cut, size - cut], np.int32), "axis": axis}


def _reshape(rng, dt):
    shape = _shape(rng, rank=3)
    target = [0, -1, shape[2]] if rng.random() < 0.5 else [shape[0] * shape[1], shape[2]]
    return {"x": _x(rng, shape, dt), "shape": np.array(target, np.int32)}


def _slice_update(rng, dt):
    case = _slice_by_index(rng, dt)
    case.pop("squeeze_mask")
    _, (sliced,) = _one_op("slice_by_index", case)
    case["update"] = _x(rng, sliced.shape, dt)
    return case


def _transpose(rng, dt):
    shape = _shape(rng)
    return {"x": _x(rng, shape, dt), "perm": rng.permutation(len(shape)).astype(np.int32)}


def _expand_dims(rng, dt):
    shape = _shape(rng, rank=2)
    return {"x": _x(rng, shape, dt), "axes": [0, -1] if rng.random() < 0.5 else [1]}


def _squeeze(rng, dt):
    shape = (1, *_shape(rng, rank=2, low=2), 1)
    return {"x": _x(rng, shape, dt), "axes": [0, -1]} if rng.random() < 0.5 else {"x": _x(rng, shape, dt)}


def _slice_by_size(rng, dt):
    shape = _shape(rng, low=2)
    begin = [int(rng.integers(0, s)) for s in shape]
    size = [-1 if rng.random() < 0.3 else int(rng.integers(1, s - b + 1)) for s, b in zip(shape, begin)]
    return {"x": _x(rng, shape, dt), "begin": np.array(begin, np.int32), "size": np.array(size, np.int32)}


def _topk(rng, dt):
    shape = _shape(rng, low=2)
    axis = int(rng.integers(-len(shape), len(shape)))
    return {
        "x": _x(rng, shape, dt),
        "k": int(rng.integers(1, shape[axis] + 1)),
        "axis": axis,
        "ascending": bool(rng.random() < 0.5),
    }


def _per_channel(rng, dt, names=("alpha",)):
    shape = _shape(rng, rank=4)
    return {"x": _x(rng, shape, dt), **{n: _x(rng, (shape[1],), dt, 0.2, 1.5) for n in names}}


def _quantize(rng, dt):
    shape = _shape(rng, rank=3)
    return {
        "input": _x(rng, shape, dt),
        "scale": _x(rng, (shape[1],), dt, 0.01, 0.1),
        "zero_point": rng.integers(-20, 20, size=(shape[1],)).astype(np.int8),
        "axis": 1,
        "output_dtype": "int8",
    }


#: op → case(rng, float dtype) giving the Builder's keyword arguments
CASES = {
    **{op: _unary() for op in ("abs", "ceil", "cos", "cosh", "erf", "exp", "exp2", "floor", "round", "sign", "sin")},
    **{
        op: _unary()
        for op in ("sinh", "square", "tanh", "relu", "relu6", "sigmoid", "softplus", "softsign", "identity")
    },
    **{op: _unary(-0.9, 0.9) for op in ("acos", "asin", "atanh", "tan", "atan")},
    **{op: _unary(0.1, 4.0) for op in ("sqrt", "rsqrt", "inverse", "log")},
    **{op: _binary() for op in ("add", "sub", "mul", "maximum", "minimum")},
    "real_div": _binary(0.5, 3.0),
    "pow": _binary(0.5, 2.0),
    "floor_div": _binary(ints=True),
    "mod": _binary(ints=True),
    **{op: _compare for op in ("equal", "not_equal", "greater", "greater_equal", "less", "less_equal")},
    **{op: _logical for op in ("logical_and", "logical_or", "logical_xor")},
    "logical_not": lambda rng, dt: {"x": rng.random(_shape(rng)) < 0.5},
    "clip": lambda rng, dt: {"x": _x(rng, _shape(rng), dt), "alpha": dt(-1.0), "beta": dt(rng.uniform(0, 2))},
    "threshold": _alpha,
    "elu": _alpha,
    "leaky_relu": _alpha,
    "thresholded_relu": _alpha,
    "clamped_relu": _alpha_beta,
    "linear_activation": _alpha_beta,
    "scaled_tanh": _alpha_beta,
    "sigmoid_hard": _alpha_beta,
    "prelu": _per_channel,
    "softplus_parametric": lambda rng, dt: _per_channel(rng, dt, ("alpha", "beta")),
    "gelu": lambda rng, dt: {
        "x": _x(rng, _shape(rng), dt),
        "mode": str(rng.choice(["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])),
    },
    "softmax": lambda rng, dt: {"x": _x(rng, (s := _shape(rng)), dt), "axis": int(rng.integers(-len(s), len(s)))},
    "cast": lambda rng, dt: {
        "x": _x(rng, _shape(rng), dt, -50, 50),
        "dtype": str(rng.choice(["int32", "fp16", "fp32", "bool"])),
    },
    **{
        op: _reduce
        for op in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_l1_norm", "reduce_l2_norm")
    },
    **{op: _reduce for op in ("reduce_sum_square", "reduce_log_sum_exp")},
    "reduce_prod": lambda rng, dt: _reduce(rng, dt, positive=True),
    "reduce_log_sum": lambda rng, dt: _reduce(rng, dt, positive=True),
    "reduce_argmax": _arg,
    "reduce_argmin": _arg,
    "argsort": lambda rng, dt: {**_arg(rng, dt), "keep_dims": None, "ascending": bool(rng.random() < 0.5)},
    "topk": _topk,
    "cumsum": lambda rng, dt: {
        "x": _x(rng, (s := _shape(rng)), dt),
        "axis": int(rng.integers(-1, len(s))),
        "reverse": bool(rng.random() < 0.5),
    },
    "band_part": lambda rng, dt: {
        "x": _x(rng, _shape(rng, rank=3), dt),
        "lower": int(rng.integers(-1, 3)),
        "upper": int(rng.integers(-1, 3)),
    },
    "layer_norm": _layer_norm,
    "l2_norm": lambda rng, dt: {"x": _x(rng, _shape(rng, rank=int(rng.integers(3, 5))), dt), "epsilon": dt(1e-6)},
    "linear": lambda rng, dt: {
        "x": _x(rng, (*_shape(rng, rank=int(rng.integers(0, 3))), k := int(rng.integers(1, 5))), dt),
        "weight": _x(rng, (int(rng.integers(1, 5)), k), dt),
    },
    "matmul": _matmul,
    "einsum": _einsum,
    "scaled_dot_product_attention": _sdpa,
    "select": lambda rng, dt: {
        "cond": rng.random(s := _shape(rng)) < 0.5,
        "a": _x(rng, s, dt),
        "b": _x(rng, tuple(1 if rng.random() < 0.3 else d for d in s), dt),
    },
    "reshape": _reshape,
    "transpose": _transpose,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "flatten2d": lambda rng, dt: {"x": _x(rng, _shape(rng, rank=3), dt), "axis": int(rng.integers(1, 3))},
    "reverse": lambda rng, dt: {"x": _x(rng, (s := _shape(rng)), dt), "axes": _axes(rng, len(s))},
    "tile": lambda rng, dt: {
        "x": _x(rng, _shape(rng, rank=3), dt),
        "reps": rng.integers(1, 3, size=3).astype(np.int32),
    },
    "concat": lambda rng, dt: {"values": (_x(rng, (2, 3), dt), _x(rng, (2, 1), dt), _x(rng, (2, 2), dt)), "axis": -1},
    "stack": lambda rng, dt: {"values": (_x(rng, (2, 3), dt), _x(rng, (2, 3), dt)), "axis": int(rng.integers(-3, 3))},
    "split": _split,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "pad": _pad,
    "gather": _gather,
    "gather_along_axis": _along_axis,
    "scatter_along_axis": lambda rng, dt: _along_axis(rng, dt, scatter=True),
    "tile_shape": None,
    "shape": lambda rng, dt: {"x": _x(rng, _shape(rng), dt)},
    "fill": lambda rng, dt: {"shape": np.array(_shape(rng), np.int32), "value": dt(rng.uniform(-3, 3))},
    "fill_like": lambda rng, dt: {"ref_tensor": _x(rng, _shape(rng), dt), "value": dt(rng.uniform(-3, 3))},
    "range_1d": lambda rng, dt: {"start": dt(-2.0), "end": dt(rng.uniform(0, 5)), "step": dt(rng.uniform(0.3, 1.0))},
    "non_zero": lambda rng, dt: {"x": (rng.random(_shape(rng)) < 0.5).astype(dt)},
    "quantize": _quantize,
}
del CASES["tile_shape"]


def _one_op(op: str, kwargs: dict):
    """A function holding one ``op`` on constant inputs; coremltools runs its ``value_inference``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Function({}, opset_version=ct.target.iOS18) as function:
            out = getattr(mb, op)(**{k: v for k, v in kwargs.items() if v is not None})
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            function.set_outputs(outs)
    return function, outs


def _interpreted(function) -> list[np.ndarray]:
    plan = plan_function("main", function, Constants())
    values = run_function(plan, {}, {})
    return [values[v.name] for v in function.outputs]


def _check(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want.astype(got.dtype) if got.dtype != np.bool_ else want)
        return
    want = want.astype(np.float64)
    if dtype == F16:  # one fp16 ulp of the larger magnitude (numpy's fp16 ufuncs round the same way)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * max(1.0, float(np.abs(want).max(initial=0))))
    else:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(want).max(initial=0))))


def test_every_op_with_a_value_inference_is_compared():
    """The table covers each op of coremltools with a numpy ``value_inference`` that the
    interpreter has a kernel for (constexpr ops are compared below)."""
    from coremltools.converters.mil.mil.operation import Operation

    from anefx.targets.mil.kernels import KERNELS

    with_reference = {
        name
        for name, versions in SSAOpRegistry.core_ops.items()
        if versions[max(versions)].value_inference is not Operation.value_inference and name in KERNELS
    }
    untested = {"reverse_sequence"}  # its value_inference raises NotImplementedError("TODO")
    assert with_reference - set(CASES) - untested == set()


def _fp32(value):
    if isinstance(value, tuple):
        return tuple(_fp32(v) for v in value)
    if isinstance(value, (np.ndarray, np.floating)) and value.dtype == F16:
        return value.astype(F32)
    return value


@pytest.mark.parametrize("op", sorted(CASES))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), half=st.booleans())
def test_kernel_matches_value_inference(op, seed, half):
    """fp16: the interpreter keeps every value in fp16 but computes inside an op in float32, so the
    reference is coremltools' value on the same fp16 inputs computed in float32, rounded to fp16 (numpy
    computing a layer_norm's mean and variance in fp16 is not what is compared)."""
    rng = np.random.default_rng(seed)
    case = CASES[op](rng, F16 if half else F32)
    function, _ = _one_op(op, case)
    _, reference = _one_op(op, {k: _fp32(v) for k, v in case.items()})
    want = [v.val for v in reference]
    assert all(w is not None for w in want), f"coremltools computed no value for {op}"
    for got, w, declared in zip(_interpreted(function), want, function.outputs):
        if half and dtype_name(declared) == "fp16":
            w = np.asarray(w).astype(F16)
        _check(got.numpy(), w, F16 if half else F32)


# ---------------------------------------------------------------------------------------------
# compressed weights: the constexpr ops against coremltools' materialized_val_inference
# ---------------------------------------------------------------------------------------------


def _sub_byte(values: np.ndarray, nbits: int, signed: bool = False) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    name = f"np_{'int' if signed else 'uint'}{nbits}_dtype"
    return values.astype(getattr(types, name)) if hasattr(types, name) else values.astype(np.uint8)


def _constexpr_ios18(rng) -> list:
    """iOS18 compression ops: grouped-channel LUT, vector LUT, sparse, block-wise shift and scale, and
    the joint (sparse + palettized / quantized) forms with their two outputs."""
    out = []
    nbits = int(rng.choice([1, 2, 4, 6, 8]))
    rows, cols = 8, 6
    indices = _sub_byte(rng.integers(0, 2**nbits, size=(rows, cols)), nbits)
    out.append(mb.constexpr_lut_to_dense(indices=indices, lut=_x(rng, (4, 1, 2**nbits, 1), F16)))
    vector = _sub_byte(rng.integers(0, 16, size=(rows // 2, cols)), 4)
    out.append(mb.constexpr_lut_to_dense(indices=vector, lut=_x(rng, (2, 1, 16, 2), F16), vector_axis=0))
    mask = _sub_byte((rng.random((rows, cols)) < 0.4).astype(np.uint8), 1)
    nonzero = _x(rng, (int(np.count_nonzero(mask)),), F16)
    out.append(mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=mask))
    data = rng.integers(-128, 128, size=(rows, cols)).astype(np.int8)
    scale, offset = _x(rng, (4, 3), F16, 0.01, 0.1), rng.integers(-3, 3, size=(4, 3)).astype(np.int8)
    out.append(mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset))
    out.append(mb.constexpr_blockwise_shift_scale(data=data, scale=scale))
    sparse_idx = _sub_byte(rng.integers(0, 4, size=int(np.count_nonzero(mask))), 2)
    out += list(
        mb.constexpr_lut_to_sparse(indices_mask=mask, indices_nonzero_data=sparse_idx, lut=_x(rng, (2, 1, 4, 1), F16))
    )
    quantized = rng.integers(-128, 128, size=int(np.count_nonzero(mask))).astype(np.int8)
    out += list(mb.constexpr_sparse_blockwise_shift_scale(data_mask=mask, nonzero_data=quantized, scale=scale))
    out.append(mb.constexpr_cast(source_val=_x(rng, (3, 4), F16), output_dtype="fp32"))
    return out


def _constexpr_ios16(rng) -> list:
    """iOS16 compression ops: one flat LUT on bit-packed indices, bit-packed sparsity, affine int8."""
    out = []
    nbits = int(rng.choice([1, 2, 4, 6, 8]))
    count = 4 * 6
    packed = rng.integers(0, 256, size=(count * nbits + 7) // 8).astype(np.uint8)
    out.append(
        mb.constexpr_lut_to_dense(indices=packed, lut=_x(rng, (2**nbits,), F16), shape=np.array([4, 6], np.uint32))
    )
    mask = rng.integers(0, 256, size=3).astype(np.uint8)
    nonzero = _x(rng, (int(np.unpackbits(mask).sum()),), F16)
    out.append(mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=mask, shape=np.array([4, 6], np.uint32)))
    quantized = rng.integers(0, 256, size=(4, 6)).astype(np.uint8)
    zero_point, scale = rng.integers(0, 256, size=(6,)).astype(np.uint8), _x(rng, (6,), F16, 0.01, 0.1)
    out.append(mb.constexpr_affine_dequantize(quantized_data=quantized, zero_point=zero_point, scale=scale, axis=1))
    out.append(
        mb.constexpr_affine_dequantize(quantized_data=quantized, zero_point=np.uint8(7), scale=F16(0.05), axis=0)
    )
    return out


@pytest.mark.parametrize("opset", ["iOS16", "iOS18"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_constexpr_kernels_match_materialized_values(opset, seed):
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Function({}, opset_version=getattr(ct.target, opset)) as function:
            outs = (_constexpr_ios18 if opset == "iOS18" else _constexpr_ios16)(rng)
            function.set_outputs(outs)
    want = {}
    for var in outs:
        value = var.op.materialized_val_inference()
        want[var.name] = value[var.op.outputs.index(var)] if isinstance(value, tuple) else value
    for got, var in zip(_interpreted(function), outs):
        np.testing.assert_array_equal(got.numpy(), np.asarray(want[var.name]).astype(got.numpy().dtype))


def test_dequantize_matches_materialized_values():
    rng = np.random.default_rng(0)
    with Function({}, opset_version=ct.target.iOS17) as function:
        quantized = rng.integers(-128, 128, size=(3, 5)).astype(np.int8)
        zero_point = rng.integers(-5, 5, size=(5,)).astype(np.int8)
        out = mb.dequantize(input=quantized, scale=_x(rng, (5,), F32, 0.01, 0.1), zero_point=zero_point, axis=1)
        function.set_outputs([out])
    (got,) = _interpreted(function)
    np.testing.assert_allclose(got.numpy(), out.op.materialized_val_inference(), rtol=1e-6)
