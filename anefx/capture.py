"""Capture: a model plus example inputs becomes anefx's canonical graph.

The canonical graph is an ATen-level :class:`torch.fx.GraphModule` produced by
``torch.export.export(..., strict=False)`` and unlifted with ``ExportedProgram.module()``: parameters
are ``get_attr`` nodes, every node carries ``meta["val"]`` (a FakeTensor with shape and dtype), and the
module keeps the model's calling convention (positional + keyword inputs, nested outputs).

Every entry point normalises into this form (an ``nn.Module``, a ``torch.fx.symbolic_trace``
GraphModule, an ``ExportedProgram``, the GraphModule ``torch.compile`` hands a backend), so every pass
is written once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree

from anefx.errors import CaptureError


@dataclass
class Captured:
    """The canonical graph and what it was captured with."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    input_names: list[str]
    output_names: list[str]
    reference_outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def flat_inputs(self) -> list:
        return flatten_inputs(self.example_args, self.example_kwargs)


def flatten_inputs(args: tuple, kwargs: Mapping | None) -> list:
    """Inputs in the order of the canonical graph's placeholders."""
    leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    return leaves


def flatten_outputs(out) -> list:
    leaves, _ = pytree.tree_flatten(out)
    return leaves


def output_names(out) -> list[str]:
    """Readable names for the leaves of a model's output (``last_hidden_state``, ``output_0`` …)."""
    paths, _ = pytree.tree_flatten_with_path(out)
    if len(paths) == 1 and not paths[0][0]:
        return ["output"]
    names = []
    for path, _leaf in paths:
        text = "_".join(_key_text(k) for k in path) or "output"
        text = re.sub(r"\W+", "_", text).strip("_")
        if text[:1].isdigit():
            text = f"output_{text}"
        names.append(text)
    return _dedupe(names)


def _key_text(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}_{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with every submodule in eval mode, then restore each module's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            m.training = False  # not model.eval(): an ExportedProgram's module refuses it
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _normalise_inputs(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tuple of tensors (got {type(example_inputs).__name__}); "
            "pass e.g. (torch.randn(1, 128, 768),) and keyword inputs through example_kwargs"
        )
    kwargs = dict(example_kwargs or {})
    for i, leaf in enumerate(flatten_inputs(example_inputs, kwargs)):
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            raise CaptureError(
                f"example input leaf #{i} is a {type(leaf).__name__}; anefx needs tensors "
                "(or Python scalars) as example inputs"
            )
    return example_inputs, kwargs


def _explain_export_failure(exc: BaseException) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    where = ""
    m = re.search(r'File "([^"]+)", line (\d+)', text)
    if m and "site-packages/torch" not in m.group(1):
        where = f" (at {m.group(1)}:{m.group(2)})"
    lowered = text.lower()
    if "data-dependent" in lowered or "data dependent" in lowered or "guardondatadependent" in lowered:
        return (
            f"data-dependent control flow{where}: the model branches or sizes a tensor on the *values* "
            f"of a tensor, which torch.export cannot capture ({first}). Make the branch depend on "
            "shapes or Python constants, use torch.cond, or wrap the model so the value is a constant."
        )
    if "dynamic" in lowered and "constraint" in lowered:
        return f"dynamic shape constraint failed{where}: {first}"
    return f"torch.export could not capture the model{where}: {type(exc).__name__}: {first}"


def capture(
    model,
    example_inputs=(),
    example_kwargs: Mapping | None = None,
) -> Captured:
    """Turn ``model`` and example inputs into anefx's canonical graph (see module docstring).

    ``model`` may be an ``nn.Module`` (including a ``torch.fx.GraphModule`` from ``symbolic_trace``)
    or a ``torch.export.ExportedProgram``. The model is run once eagerly on the example inputs (its
    outputs become the validation reference) and is never modified.
    """
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        if callable(model):
            raise CaptureError(
                f"anefx.capture needs an nn.Module, got the function {getattr(model, '__name__', model)!r}: "
                "wrap it in an nn.Module whose forward calls it"
            )
        raise CaptureError(f"anefx.capture needs an nn.Module, got {type(model).__name__}")

    with eval_mode(model):
        try:
            with torch.no_grad():
                reference = model(*args, **kwargs)
        except Exception as exc:  # the inputs do not fit the model: say so before export muddles it
            raise CaptureError(
                f"the model fails on the example inputs in eager PyTorch, so they do not fit it: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                f"(inputs: {_describe_inputs(args, kwargs)})"
            ) from exc
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:
            raise CaptureError(_explain_export_failure(exc)) from exc

    gm = ep.module(check_guards=False)  # no _guards_fn node: anefx compiles for static shapes
    if not all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function")):
        from anefx.graph import refresh_meta

        refresh_meta(gm, flatten_inputs(args, kwargs))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return Captured(
        graph_module=gm,
        example_args=args,
        example_kwargs=kwargs,
        input_names=names,
        output_names=output_names(reference),
        reference_outputs=[t.detach() if isinstance(t, torch.Tensor) else t for t in flatten_outputs(reference)],
    )


def _describe_inputs(args, kwargs) -> str:
    from anefx.graph import tensor_str

    parts = [tensor_str(a) for a in args] + [f"{k}={tensor_str(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)
