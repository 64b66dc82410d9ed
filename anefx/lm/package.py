"""One ``.mlpackage`` for a compiled causal LM: ``prefill`` and ``decode`` sharing weights and states.

Each validated step function is legalized like any anefx graph (:func:`legalized_clone`: the states are
still graph inputs, so nothing reading the cache can be folded into a constant), wrapped in
:class:`~anefx.lm.stateful.Stateful` (the states become buffers copied in place), exported and
converted by coremltools for iOS18 (mutated buffers become ``ct.StateType`` states, fp16). The two
programs are merged with ``MultiFunctionDescriptor`` + ``save_multifunction``, which deduplicates the
weights both functions hold, and the generation metadata is written into the package.
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from anefx.compat.coremltools import operations
from anefx.ir.errors import ConversionError
from anefx.lm.cache import CacheLayout
from anefx.lm.stateful import Stateful
from anefx.targets.base import Artifact, HandOff, legalized_clone
from anefx.targets.coreml import (
    CoreMLOptions,
    coremltools_module,
    deterministic_manifest,
    explain_failure,
    quiet_coremltools,
    register_converters,
)
from anefx.targets.mil_pipeline import pass_pipeline

FUNCTIONS = ("prefill", "decode")

#: What each input and output of both functions means (also written into the package metadata).
INPUTS_DOC = {
    "input_ids": "int32 (1, T): token ids of this chunk (T = prefill_length for prefill, 1 for decode); "
    "pad a short last chunk with any id",
    "position_ids": "int32 (1, T): positions of the chunk's tokens, consecutive from the number of tokens "
    "already in the cache; padding positions >= context_length are not written",
    "logits": "float (1, T, vocab): next-token logits for every token of the chunk",
}


@dataclass
class LMFunction:
    """One converted function: its op histogram and the coremltools model it came from."""

    name: str
    mlmodel: object
    seconds: float
    exported_program: object = field(default=None, repr=False)  #: what was converted (states as buffers)

    @property
    def model(self):
        return self.mlmodel

    def operations(self) -> list:
        return operations(self.mlmodel)

    def op_histogram(self) -> collections.Counter:
        return collections.Counter(op.op_type for op in self.operations() if op.op_type != "const")


def convert_function(
    name: str,
    graph_module: torch.fx.GraphModule,
    layout: CacheLayout,
    example: tuple[torch.Tensor, torch.Tensor],
    options: CoreMLOptions,
) -> LMFunction:
    """Convert one validated step function into a stateful ML Program (iOS18 or later)."""
    states = layout.zeros()
    handoff = HandOff(
        graph_module=graph_module,
        example_args=(*example, *states),
        example_kwargs={},
        input_names=["input_ids", "position_ids", *layout.state_names],
        output_names=["logits", *layout.state_names],
    )
    legal = legalized_clone(handoff)
    wrapper = Stateful(legal, layout, [s.clone() for s in states])
    return convert_stateful(name, wrapper, example, ["logits"], options, graph_module)


def convert_stateful(
    name: str,
    wrapper: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    output_names: list[str],
    options: CoreMLOptions,
    graph_module: torch.fx.GraphModule,
) -> LMFunction:
    """Export a module whose buffers are mutated in place and convert it with the buffers as Core ML
    states (iOS18 or later); ``output_names`` name its outputs."""
    ct = coremltools_module()
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(example), strict=False).run_decompositions({})
    except Exception as exc:
        raise ConversionError(f"exporting the stateful {name} function failed: {type(exc).__name__}: {exc}") from exc
    target, precision, units = options.resolved()
    target = max(target, ct.target.iOS18)  # Core ML states need iOS18 / macOS15
    register_converters()
    kwargs = dict(options.convert_kwargs)
    if "pass_pipeline" not in kwargs and options.fast_conversion:
        kwargs["pass_pipeline"] = pass_pipeline(ct, fp16=options.precision_name == "float16")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), quiet_coremltools():
            warnings.simplefilter("ignore")
            mlmodel = ct.convert(
                ep,
                convert_to="mlprogram",
                minimum_deployment_target=target,
                compute_precision=precision,
                compute_units=units,
                outputs=[ct.TensorType(name=n) for n in output_names],
                skip_model_load=True,
                **kwargs,
            )
    except Exception as exc:
        raise ConversionError(f"{name}: {explain_failure(exc, ep, graph_module)}") from exc
    return LMFunction(name, mlmodel, time.perf_counter() - t0, ep)


@dataclass
class LMPackage(Artifact):
    """The merged package, staged in a private temporary directory until :meth:`save`."""

    functions: dict[str, LMFunction] = field(default_factory=dict)
    staged: Path | None = None
    suffix = ".mlpackage"

    def op_histogram(self, function: str = "decode") -> collections.Counter:
        return self.functions[function].op_histogram()

    def _write(self, path: Path) -> None:
        shutil.copytree(self.staged, path)
        deterministic_manifest(path)

    def __del__(self):
        if self.staged is not None:
            shutil.rmtree(self.staged.parent, ignore_errors=True)


def merge(functions: dict[str, LMFunction], metadata: dict[str, str], default: str = "decode") -> LMPackage:
    """Write both functions into one package (weights deduplicated) with ``metadata`` attached."""
    ct = coremltools_module()
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    tmp = Path(tempfile.mkdtemp(prefix="anefx-lm-"))
    try:
        desc = MultiFunctionDescriptor()
        for name, fn in functions.items():
            single = tmp / f"{name}.mlpackage"
            fn.mlmodel.save(str(single))
            desc.add_function(str(single), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        merged = tmp / "merged.mlpackage"
        with warnings.catch_warnings(), quiet_coremltools():
            warnings.simplefilter("ignore")
            save_multifunction(desc, str(merged))
            model = ct.models.MLModel(str(merged), skip_model_load=True)
            model.user_defined_metadata.update(metadata)
            model.short_description = metadata.get("co.huggingface.exporters.name", "")
            final = tmp / "package" / "model.mlpackage"
            final.parent.mkdir()
            model.save(str(final))
        for name in functions:
            shutil.rmtree(tmp / f"{name}.mlpackage", ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LMPackage(model=model, functions=functions, staged=final)


def metadata_for(
    *, name: str, architecture: str, layout: CacheLayout, prefill_length: int, eos_ids: list[int], precision: str
) -> dict[str, str]:
    """User-defined metadata: swift-transformers / exporters keys where they exist, ``anefx.*`` otherwise."""
    return {
        "co.huggingface.exporters.name": name,
        "co.huggingface.exporters.task": "text-generation",
        "co.huggingface.exporters.architecture": architecture,
        "co.huggingface.exporters.framework": "pytorch",
        "co.huggingface.exporters.precision": precision,
        "anefx.functions": ",".join(FUNCTIONS),
        "anefx.context_length": str(layout.context),
        "anefx.prefill_length": str(prefill_length),
        "anefx.eos_token_ids": json.dumps(eos_ids),
        "anefx.states": json.dumps({k: list(v) for k, v in layout.states.items()}),
        "anefx.inputs": json.dumps(INPUTS_DOC),
    }
