"""Causal-LM generation on the ANE: ``compile_lm`` → ``CompiledLM`` (prefill + decode, KV cache as state).

Layering: this package sits above the pipeline and the targets; nothing below imports it.
"""

from anefx.lm.cache import CacheLayout
from anefx.lm.compile import CompiledLM, EndToEndCheck, Generation, GenerationMismatch, compile_lm

__all__ = ["CacheLayout", "CompiledLM", "EndToEndCheck", "Generation", "GenerationMismatch", "compile_lm"]
