"""Capture: a model plus example inputs becomes anefx's canonical graph.

The canonical graph is an ATen-level :class:`torch.fx.GraphModule` produced by
``torch.export.export(..., strict=False)`` and unlifted with ``ExportedProgram.module()``: parameters
are ``get_attr`` nodes, every node carries ``meta["val"]`` (a FakeTensor with shape and dtype), and the
module keeps the model's calling convention (positional + keyword inputs, nested outputs).

Every entry point normalises into this form (an ``nn.Module``, a ``torch.fx.symbolic_trace``
GraphModule, an ``ExportedProgram``, the GraphModule ``torch.compile`` hands a backend), so every pass
is written once.

Inputs and outputs follow one rule, so that decoders are captured as users call them:

* **Inputs**: an example input (positional or keyword) holding no tensor at all (``use_cache=False``,
  ``return_dict=True``, ``output_attentions=False``, an int, ``None``) is *specialised*: the graph is
  captured with that value as a constant and it never becomes a graph input. The compiled model
  still accepts it: the same value (or leaving it out) is fine, a different value raises
  :class:`~anefx.ir.errors.CaptureError`. An input mixing tensors and other values (a cache object, a
  tuple of a tensor and a string) is refused with its name.
* **Outputs**: cache objects (``DynamicCache`` and friends, recognised with ``transformers``' own
  ``is_cache_object``) are *dropped*: a ``ModelOutput`` loses the field, a tuple, list or dict the
  entry (as ``ModelOutput.to_tuple`` leaves out ``None`` fields). anefx compiles the full-sequence
  forward; the KV cache of generation is ``anefx.lm``'s business. Every other output leaf must be
  a tensor; anything else is refused with its name.
  Reference outputs, output names and validation all see the outputs after this rule.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from anefx.compat import torch as pytree
from anefx.ir.errors import AnefxError, CaptureError


@dataclass
class Captured:
    """The canonical graph and what it was captured with."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    input_names: list[str]
    output_names: list[str]
    reference_outputs: list[torch.Tensor] = field(default_factory=list)
    #: Non-tensor inputs captured as constants (see the module docstring).
    constants: Specialised = field(default_factory=lambda: Specialised())
    #: Names of the outputs the capture rule dropped (cache objects).
    dropped_outputs: list[str] = field(default_factory=list)

    @property
    def flat_inputs(self) -> list:
        return flatten_inputs(self.example_args, self.example_kwargs)

    def release_reference_outputs(self, why: str) -> None:
        """Drop the eager outputs (an encoder-decoder's step function validated against its captured
        graph reads them only to scale its tolerances: Whisper-large-v3's cross states alone are
        0.5 GB); reading them afterwards raises, saying ``why``."""
        self.reference_outputs = Released(f"the eager reference outputs were released: {why}")


class Released(Sequence):
    """Values dropped to save memory: any read raises :class:`AnefxError` with the reason (an empty
    list would let a comparison over them pass silently)."""

    def __init__(self, message: str):
        self.message = message

    def __len__(self) -> int:
        raise AnefxError(self.message)

    def __getitem__(self, k):
        raise AnefxError(self.message)

    def __iter__(self):
        raise AnefxError(self.message)

    def __repr__(self) -> str:
        return f"Released({self.message!r})"


@dataclass(frozen=True)
class Specialised:
    """Example inputs without tensors, captured as constants: positional ones by position, keyword
    ones by name. :meth:`strip` takes them out of a call (checking their values)."""

    args: dict[int, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # readable names of the positional ones

    def __bool__(self) -> bool:
        return bool(self.args or self.kwargs)

    def strip(self, args: tuple, kwargs: Mapping) -> tuple[tuple, dict]:
        """The call without the specialised inputs; a different value than at capture raises."""
        kept = []
        for i, value in enumerate(args):
            if i in self.args:
                self._check(self.names.get(i, f"positional input #{i}"), value, self.args[i])
            else:
                kept.append(value)
        rest = {}
        for name, value in kwargs.items():
            if name in self.kwargs:
                self._check(name, value, self.kwargs[name])
            else:
                rest[name] = value
        return tuple(kept), rest

    @staticmethod
    def _check(name: str, value, expected) -> None:
        same = value is expected or (type(value) is type(expected) and not isinstance(value, torch.Tensor))
        if same and value is not expected:
            try:
                same = bool(value == expected)
            except Exception:
                same = False
        if not same:
            raise CaptureError(
                f"input {name!r} was {expected!r} when the model was compiled and is {value!r} now; "
                f"it is a constant of the compiled graph: compile again with {name}={value!r}"
            )


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
    return example_inputs, kwargs


def _positional_names(model: torch.nn.Module, n: int) -> list[str]:
    """The forward's parameter names for the first ``n`` positional inputs (``args_i`` past them)."""
    names = []
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return [names[i] if i < len(names) else f"args_{i}" for i in range(n)]


def _specialise(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, Specialised]:
    """Split the example inputs into graph inputs (tensors) and constants (no tensor at all)."""
    pos_names = _positional_names(model, len(args))
    named = [(pos_names[i], i, a) for i, a in enumerate(args)] + [(k, k, v) for k, v in kwargs.items()]
    const_args, const_kwargs, names = {}, {}, {}
    for name, key, value in named:
        paths, _ = pytree.tree_flatten_with_path(value)
        tensors = [leaf for _, leaf in paths if isinstance(leaf, torch.Tensor)]
        others = [(p, leaf) for p, leaf in paths if not isinstance(leaf, torch.Tensor)]
        if not tensors:
            if not _is_constant_value(value):
                raise CaptureError(
                    f"input {name!r} is a {type(value).__name__}, which anefx can neither pass to the "
                    "compiled graph nor bake into it; give tensors, or Python scalars/None/strings as constants"
                )
            if isinstance(key, int):
                const_args[key], names[key] = value, name
            else:
                const_kwargs[key] = value
        elif others:
            path, leaf = others[0]
            where = name + "".join(_key_suffix(k) for k in path)
            raise CaptureError(
                f"input {where!r} is a {type(leaf).__name__} inside an input that also holds tensors; anefx "
                "needs every input to be either tensors only (graph inputs) or no tensor at all (constants)"
            )
    if not (const_args or const_kwargs):
        return args, kwargs, Specialised()
    targs = tuple(a for i, a in enumerate(args) if i not in const_args)
    tkwargs = {k: v for k, v in kwargs.items() if k not in const_kwargs}
    return targs, tkwargs, Specialised(const_args, const_kwargs, names)


def _is_constant_value(value) -> bool:
    leaves = pytree.tree_leaves(value)
    return all(v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)) for v in leaves)


def _key_suffix(key) -> str:
    return f"[{_key_text(key)!r}]" if hasattr(key, "key") else f"[{_key_text(key)}]"


def _is_cache(value) -> bool:
    """A cache object of ``transformers`` (by its own rule), if transformers is in use at all."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.exporters.exporter_dynamo import is_cache_object
    except ImportError:  # transformers without the exporters: fall back on its base class
        from transformers.cache_utils import Cache

        return isinstance(value, Cache)
    return is_cache_object(value)


def drop_caches(out, dropped: list[str] | None = None, prefix: str = "output"):
    """``out`` without its cache objects (the output rule of the module docstring). Names of what was
    dropped are appended to ``dropped``."""
    dropped = dropped if dropped is not None else []
    if _is_cache(out):
        dropped.append(prefix)
        return None
    model_output = _model_output_type(out)
    if model_output is not None:
        kept = {}
        for k, v in out.items():
            new = drop_caches(v, dropped, k)
            if new is not None:
                kept[k] = new
        return out if len(kept) == len(out) and all(kept[k] is out[k] for k in kept) else model_output(**kept)
    if (isinstance(out, tuple) and not hasattr(out, "_fields")) or type(out) is list:
        items = [(v, drop_caches(v, dropped, f"{prefix}_{i}")) for i, v in enumerate(out)]
        return type(out)(new for v, new in items if new is not None or v is None)
    if type(out) is dict:
        items = [(k, v, drop_caches(v, dropped, str(k))) for k, v in out.items()]
        return {k: new for k, v, new in items if new is not None or v is None}
    return out


def _model_output_type(out):
    if "transformers" not in sys.modules:
        return None
    from transformers.utils.generic import ModelOutput

    return type(out) if isinstance(out, ModelOutput) else None


def _check_outputs(out) -> None:
    paths, _ = pytree.tree_flatten_with_path(out)
    for path, leaf in paths:
        if not isinstance(leaf, torch.Tensor):
            name = "_".join(_key_text(k) for k in path) or "output"
            raise CaptureError(
                f"output {name!r} is a {type(leaf).__name__}, not a tensor; anefx compiles models whose "
                "outputs are tensors (cache objects are dropped): return only tensors from forward"
            )


@contextlib.contextmanager
def _specialised_forward(model: torch.nn.Module, constants: Specialised, names: list[str], n_kw: list[str]):
    """Temporarily give ``model`` a forward that takes only the tensor inputs, fills in the constants
    and drops cache outputs (the way ``transformers``' own exporter patches ``forward``)."""
    original = model.forward
    had_own = "forward" in model.__dict__
    own = model.__dict__.get("forward")

    def forward(*targs, **tkwargs):
        full = list(targs)
        for pos in sorted(constants.args):
            full.insert(pos, constants.args[pos])
        return drop_caches(original(*full, **tkwargs, **constants.kwargs))

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in n_kw]
    forward.__signature__ = inspect.Signature(params)
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = own
        else:
            del model.forward


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
    if _takes_use_cache(model) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # caches are dropped from the outputs: don't build them at all
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        if callable(model):
            raise CaptureError(
                f"anefx.ir.capture needs an nn.Module, got the function {getattr(model, '__name__', model)!r}: "
                "wrap it in an nn.Module whose forward calls it"
            )
        raise CaptureError(f"anefx.ir.capture needs an nn.Module, got {type(model).__name__}")

    graph_args, graph_kwargs, constants = _specialise(model, args, kwargs)
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
        dropped: list[str] = []
        reference = drop_caches(reference, dropped)
        _check_outputs(reference)
        patch = contextlib.nullcontext()
        if constants or dropped:
            names = [n for i, n in enumerate(_positional_names(model, len(args))) if i not in constants.args]
            patch = _specialised_forward(model, constants, names, list(graph_kwargs))
        try:
            # under no_grad: a model's own ``torch.no_grad()`` (transformers' rotary embedding) then
            # changes nothing and export inlines it, instead of wrapping it in a
            # ``wrap_with_set_grad_enabled`` higher-order op (a submodule passes cannot see into, and
            # which keeps the Core ML hand-off from lifting the graph directly)
            with patch, torch.no_grad():
                ep = torch.export.export(model, graph_args, graph_kwargs, strict=False)
        except Exception as exc:
            raise CaptureError(_explain_export_failure(exc)) from exc

    gm = ep.module(check_guards=False)  # no _guards_fn node: anefx compiles for static shapes
    if not all("val" in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "call_function")):
        from anefx.ir.graph import refresh_meta

        refresh_meta(gm, flatten_inputs(graph_args, graph_kwargs))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return Captured(
        graph_module=gm,
        example_args=graph_args,
        example_kwargs=graph_kwargs,
        input_names=names,
        output_names=output_names(reference),
        reference_outputs=[t.detach() for t in flatten_outputs(reference)],
        constants=constants,
        dropped_outputs=dropped,
    )


def _describe_inputs(args, kwargs) -> str:
    from anefx.ir.graph import tensor_str

    parts = [tensor_str(a) for a in args] + [f"{k}={tensor_str(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _takes_use_cache(model) -> bool:
    """Whether ``model`` is a transformers model whose ``forward`` builds a KV cache by default."""
    import inspect

    if not hasattr(getattr(model, "config", None), "use_cache"):
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False
