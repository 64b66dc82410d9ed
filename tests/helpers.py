"""Shared test helpers: run one pass on an example, count ops, compare numerics."""

from __future__ import annotations

import copy

import torch

import anefx
from anefx.driver.validate import run_flat
from anefx.ir.graph import op_histogram
from anefx.passes import pass_by_name
from examples import models


def example(name: str, **kwargs):
    return getattr(models, name)(**kwargs)


def prepare(factory: str, *passes: str, factory_kwargs=None):
    """Capture an example and run ``passes`` on it; returns (captured, graph module)."""
    model, args, kwargs = example(factory, **(factory_kwargs or {}))
    cap = anefx.capture(model, args, kwargs)
    res = anefx.Pipeline.from_names(passes).run(
        cap.graph_module, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    assert not [r for r in res.records if r.rolled_back], [r.error for r in res.records]
    return cap, res.graph_module


def apply(pass_name: str, gm, cap, **options):
    """Run one pass (validated) on ``gm``; returns (new gm, record)."""
    res = anefx.Pipeline((pass_by_name(pass_name, **options),)).run(
        gm, cap.flat_inputs, reference_outputs=cap.reference_outputs
    )
    return res.graph_module, res.records[0]


def ops(gm) -> dict:
    return dict(op_histogram(gm))


def max_abs_diff(gm, cap, inputs=None) -> float:
    flat = inputs if inputs is not None else cap.flat_inputs
    out = run_flat(gm, flat)
    ref = run_flat(cap.graph_module, flat)
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(out, ref))


def rel_err(gm, cap) -> float:
    out = run_flat(gm, cap.flat_inputs)
    return max(
        float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))
        for a, b in zip(out, cap.reference_outputs)
    )


def half_copy(model, args):
    """An fp16 copy of a model and its float inputs (the user's model is not touched)."""
    m = copy.deepcopy(model).half()
    return m, tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def reads_projection(node) -> bool:
    """Whether ``node`` depends on a conv (a projection): attention head chunks do, the cos/sin
    tables of rotary embeddings do not."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.target == torch.ops.aten.conv2d.default:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False
