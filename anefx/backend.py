"""``torch.compile`` backend: ``torch.compile(model, backend="anefx")``.

Registered through the ``torch_dynamo_backends`` entry point, so no import is needed. For options::

    torch.compile(model, backend=anefx.backend(save_dir="out", pipeline=..., target="coreml"))

Dynamo hands the backend one torch-level graph per captured region (graph breaks give several), with
parameters and buffers lifted into graph inputs. The backend binds them back as constants, runs
anefx's capture (so the graph is normalised into the canonical ATen graph), the pipeline with its
per-pass validation and, when a save directory is given, the hand-off; it returns a callable that
runs the rewritten graph in PyTorch (no ANE is needed to run it).

A graph anefx cannot compile runs as it came, with one warning naming the cause: dynamic shapes,
a capture error, or any other exception raised inside anefx (a bug included). A backend must never
break the user's program.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.compat.torch import is_dynamo_static_input
from anefx.ir.errors import AnefxError

_LIFTED = re.compile(r"(_parameters_|_buffers_|^L_self_|^l_self_)")


class _Bound(torch.nn.Module):
    """The dynamo graph with its lifted parameters and buffers bound back as constants."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence, lifted: list[int]):
        super().__init__()
        self.gm = gm
        self.lifted = lifted
        self.n_inputs = len(example_inputs)
        for i in lifted:
            value = example_inputs[i]
            if isinstance(value, torch.nn.Parameter):
                self.register_parameter(f"c{i}", value)
            else:
                self.register_buffer(f"c{i}", value, persistent=False)

    def forward(self, *user_inputs):
        it = iter(user_inputs)
        full = [getattr(self, f"c{i}") if i in self.lifted else next(it) for i in range(self.n_inputs)]
        return self.gm(*full)


def _lifted_positions(gm: torch.fx.GraphModule, example_inputs: Sequence) -> list[int]:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for i, (name, value) in enumerate(zip(names, example_inputs)):
        source = gm.graph.find_nodes(op="placeholder", target=name)
        static = bool(source) and is_dynamo_static_input(source[0])
        if isinstance(value, torch.nn.Parameter) or static or (_LIFTED.search(name) and "_modules_" in name):
            out.append(i)
    return out


class AnefxBackend:
    """A configured backend. Options are those of :func:`anefx.compile`, plus ``save_dir``."""

    def __init__(self, save_dir: str | Path | None = None, **compile_options: Any):
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.options = compile_options
        self.compiled: list = []  # every CompiledModel made, in order (for inspection and tests)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        try:
            if any(not isinstance(x, torch.Tensor) for x in example_inputs) or _is_dynamic(gm):
                warnings.warn(
                    "anefx compiles static shapes; this graph has dynamic sizes and runs uncompiled. "
                    "Use torch.compile(..., dynamic=False) to get one static graph per shape.",
                    stacklevel=2,
                )
                return gm.forward
            return self._compile(gm, example_inputs)
        except Exception as exc:  # anything inside anefx, a bug included, must not break the program
            _warn_fallback(exc)
            return gm.forward

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
        from anefx.compile import compile as anefx_compile

        lifted = _lifted_positions(gm, example_inputs)
        user_inputs = tuple(x for i, x in enumerate(example_inputs) if i not in lifted)
        options = dict(self.options)
        options.setdefault("convert", self.save_dir is not None)
        compiled = anefx_compile(_Bound(gm, example_inputs, lifted), user_inputs, **options)
        index = len(self.compiled)
        self.compiled.append(compiled)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            compiled.save(self.save_dir / f"graph_{index}{compiled.artifact.target.suffix}")
            (self.save_dir / f"graph_{index}.report.json").write_text(compiled.report.to_json())
        graph_module = compiled.graph_module
        keep = [i for i in range(len(example_inputs)) if i not in lifted]

        fallback: list = []  # set once the rewritten graph failed: the rest of the run stays eager

        def run(*args):
            if not fallback:
                try:
                    with torch.no_grad():
                        return graph_module(*(args[i] for i in keep))
                except Exception as exc:  # the rewritten graph must not break the program either
                    _warn_fallback(exc)
                    fallback.append(exc)
            return gm.forward(*args)

        run.anefx_compiled = compiled  # type: ignore[attr-defined]
        return run


def _warn_fallback(exc: BaseException) -> None:
    """The one warning of a fallback to eager: it names the cause (an anefx bug shows its type)."""
    kind = "" if isinstance(exc, AnefxError) else f"{type(exc).__name__} inside anefx: "
    warnings.warn(f"anefx could not compile this graph, running it uncompiled: {kind}{exc}", stacklevel=3)


def _is_dynamic(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        v = node.meta.get("example_value")
        if isinstance(v, torch.Tensor) and any(not isinstance(s, int) for s in v.shape):
            return True
        if isinstance(v, torch.SymInt):
            return True
    return False


def backend(save_dir: str | Path | None = None, **compile_options: Any) -> AnefxBackend:
    """A configured backend for ``torch.compile(model, backend=anefx.backend(...))``."""
    return AnefxBackend(save_dir=save_dir, **compile_options)


def anefx_backend(gm: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
    """The default backend behind ``backend="anefx"`` (passes and validation; no conversion)."""
    return AnefxBackend()(gm, example_inputs)
