"""The static traffic estimate (anefx.ane.traffic) on MIL programs built op by op: exact byte counts."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from anefx.ane.traffic import context_growth, estimate_traffic

C, S, V = 64, 256, 100  # channels, context, vocabulary
FP16 = 2


def _ios18(build, *specs):
    import coremltools as ct

    prog = mb.program(input_specs=list(specs), opset_version=ct.target.iOS18)(build)
    return prog.functions["main"]


def test_weights_once_and_activations_padded_on_the_last_axis():
    w = np.random.default_rng(0).standard_normal((C, C, 1, 1)).astype(np.float16)

    def build(x):
        weight = mb.const(val=w)
        a = mb.conv(x=x, weight=weight)  # the same weight constant read by two convs: counted once
        b = mb.conv(x=a, weight=weight)
        return mb.add(x=a, y=b)

    t = estimate_traffic(_ios18(build, mb.TensorSpec((1, C, 1, 1), dtype=types.fp16)))
    padded = C * 64  # (1, C, 1, 1): one fp16 value per row, each row padded to 64 bytes
    assert t.weight_bytes == C * C * FP16
    conv = [o for o in t.ops if o.op_type == "conv"]
    assert [o.read for o in conv] == [padded, padded] and [o.written for o in conv] == [padded, padded]
    assert [o.weights for o in conv] == [C * C * FP16, 0]
    add = next(o for o in t.ops if o.op_type == "add")
    assert (add.read, add.written) == (2 * padded, padded)
    assert t.total == t.weight_bytes + 7 * padded  # conv: 2 reads, 2 writes; add: 2 reads, 1 write
    assert t.states == {} and t.floor == t.weight_bytes


def test_a_view_that_keeps_the_last_axis_moves_nothing_and_a_copy_is_counted():
    """A one-token column (1, C, 1, 1) viewed as (1, H, D, 1) and read by ``q^T @ K`` (transpose_x):
    the view is free, the product reads the padded column; moved into rows (1, H, 1, D) it is a copy
    (read padded, written dense) that the product then reads dense."""
    h, d = 4, C // 4

    def build(q, k):
        col = mb.reshape(x=q, shape=(1, h, d, 1))
        rows = mb.reshape(x=q, shape=(1, h, 1, d))
        return mb.matmul(x=col, y=k, transpose_x=True), mb.matmul(x=rows, y=k), mb.transpose(x=col, perm=[0, 1, 3, 2])

    specs = (mb.TensorSpec((1, C, 1, 1), dtype=types.fp16), mb.TensorSpec((1, h, d, S), dtype=types.fp16))
    t = estimate_traffic(_ios18(build, *specs))
    view, copy = (o for o in t.ops if o.op_type == "reshape")
    padded, dense = C * 64, h * 64  # d = 16 values (32 bytes) per row, padded to 64
    assert (view.read, view.written) == (0, 0)
    assert (copy.read, copy.written) == (padded, dense)
    by_col, by_rows = (o for o in t.ops if o.op_type == "matmul")
    assert by_col.read - by_rows.read == padded - dense  # the same K; the query padded or dense
    (swap,) = (o for o in t.ops if o.op_type == "transpose")  # (1, H, D, 1) -> (1, H, 1, D): data moves
    assert (swap.read, swap.written) == (padded, dense)


def test_gather_from_a_table_reads_its_rows_not_the_table():
    table = np.ones((V, C), np.float16)

    def build(ids):
        return mb.gather(x=table, indices=ids, axis=0)

    t = estimate_traffic(_ios18(build, mb.TensorSpec((1, 1), dtype=types.int32)))
    gather = next(o for o in t.ops if o.op_type == "gather")
    assert gather.weights == C * FP16  # one row of (1, 1, C): C fp16 values, a multiple of 64 bytes
    assert t.weight_bytes == C * FP16


def _cache_step(context: int, in_place: bool):
    """One decode step's cache write and read: a column written at a run-time position, then the
    whole cache read by a product with a (1, C, 1, 1) query-like vector."""
    import coremltools as ct

    shape = (1, C, 1, context)

    def build(new, pos, state):
        cache = mb.read_state(input=state)
        if in_place:
            begin = mb.concat(values=[np.zeros(3, np.int32), pos], axis=0)
            end = mb.add(x=begin, y=np.array([1, C, 1, 1], np.int32))
            updated = mb.slice_update(x=cache, update=new, begin=begin, end=end)
        else:  # the one-hot form: cache * (1 - onehot) + new * onehot
            onehot = np.zeros((context,), np.float16)
            onehot[3] = 1
            updated = mb.add(x=mb.mul(x=cache, y=1 - onehot), y=mb.mul(x=new, y=onehot))
        mb.coreml_update_state(state=state, value=updated)
        return mb.reduce_sum(x=updated, axes=[1], keep_dims=True)

    prog = mb.program(
        input_specs=[
            mb.TensorSpec((1, C, 1, 1), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.StateTensorSpec(shape, dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )(build)
    return estimate_traffic(prog.functions["main"], "decode")


def test_slice_update_of_a_state_is_in_place_and_the_one_hot_write_rewrites_the_cache():
    cache = C * S * FP16
    column = C * 64  # (1, C, 1, 1) padded
    t = _cache_step(S, in_place=True)
    assert t.states and t.state_bytes == cache
    write = next(o for o in t.ops if o.op_type == "slice_update")
    assert write.written == column and write.state_written == column
    assert write.read == column + 64 * 2  # the update, and begin/end (int32, one padded row each)
    read = next(o for o in t.ops if o.op_type == "reduce_sum")
    assert read.read == cache and read.state_read == cache  # the updated cache is the state, where it lies
    one_hot = _cache_step(S, in_place=False)
    big = [o for o in one_hot.ops if o.op_type in ("mul", "add") and o.written == cache]
    assert len(big) == 3  # cache * keep, new * onehot (broadcast to the cache), their sum
    assert one_hot.total - t.total > 3 * cache


def test_context_growth_is_the_bytes_proportional_to_the_context():
    short, long = _cache_step(128, in_place=True), _cache_step(512, in_place=True)
    g = context_growth(short, 128, long, 512)
    # what grows: the cache read by reduce_sum (C * ctx * 2) and its output row (1, 1, 1, ctx)
    per_token = C * FP16 + FP16
    assert g.growing == per_token * 512
    assert g.state_bytes == C * 512 * FP16
    assert g.times_cache == pytest.approx(1 + 1 / C)
    assert set(g.by_op_type) == {"reduce_sum"}
    assert "grows with the context" in str(g) and "ESTIMATE" in str(g)
    with pytest.raises(ValueError, match="longer second context"):
        context_growth(long, 512, short, 128)
