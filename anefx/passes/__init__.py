"""anefx's passes, listed explicitly (no registry filled by import side effects).

``DEFAULT_PASSES`` is the order ``Pipeline.default()`` runs them in; ``ALL_PASSES`` adds passes that
are available but not on by default.
"""

from __future__ import annotations

from anefx.passes.attention_bc1s import AttentionBC1S
from anefx.passes.attention_chunks import AttentionChunks
from anefx.passes.base import NoOptions, Pass, PassContext, PassResult
from anefx.passes.cache_write_bc1s import CacheWriteBC1S
from anefx.passes.canonicalize import Canonicalize
from anefx.passes.conv1d_bc1s import Conv1dBC1S
from anefx.passes.fold_constants import FoldConstants
from anefx.passes.fold_transposes import FoldTransposes
from anefx.passes.fp16_mask_values import Fp16MaskValues
from anefx.passes.fp16_norm_scale import Fp16NormScale
from anefx.passes.fp16_residual_scale import Fp16ResidualScale
from anefx.passes.group_norm_4d import GroupNorm4D
from anefx.passes.grouped_projection import GroupedProjection
from anefx.passes.layer_norm_bc1s import LayerNormBC1S
from anefx.passes.linear_to_conv import LinearToConv
from anefx.passes.rms_norm_bc1s import RMSNormBC1S
from anefx.passes.split_modulation import SplitModulation
from anefx.passes.to_bc1s import ToBC1S
from anefx.passes.token_batch_norm import TokenBatchNorm

DEFAULT_PASSES: tuple[type[Pass], ...] = (
    Canonicalize,
    TokenBatchNorm,
    FoldConstants,
    SplitModulation,
    GroupedProjection,
    LinearToConv,
    Conv1dBC1S,
    LayerNormBC1S,
    RMSNormBC1S,
    GroupNorm4D,
    CacheWriteBC1S,
    AttentionBC1S,
    AttentionChunks,
    Fp16MaskValues,
    ToBC1S,
    FoldTransposes,
    Fp16ResidualScale,
    Fp16NormScale,
)

ALL_PASSES: tuple[type[Pass], ...] = DEFAULT_PASSES


def default_passes() -> list[Pass]:
    """Fresh instances of the default passes, in order."""
    return [cls() for cls in DEFAULT_PASSES]


def pass_by_name(name: str, **options) -> Pass:
    for cls in ALL_PASSES:
        if cls.name == name:
            return cls(**options)
    raise KeyError(f"unknown pass {name!r}; available: {[c.name for c in ALL_PASSES]}")


__all__ = [
    "ALL_PASSES",
    "DEFAULT_PASSES",
    "AttentionBC1S",
    "AttentionChunks",
    "CacheWriteBC1S",
    "Canonicalize",
    "Conv1dBC1S",
    "FoldConstants",
    "FoldTransposes",
    "Fp16MaskValues",
    "Fp16NormScale",
    "Fp16ResidualScale",
    "GroupNorm4D",
    "GroupedProjection",
    "LayerNormBC1S",
    "LinearToConv",
    "NoOptions",
    "Pass",
    "PassContext",
    "PassResult",
    "RMSNormBC1S",
    "SplitModulation",
    "ToBC1S",
    "TokenBatchNorm",
    "default_passes",
    "pass_by_name",
]
