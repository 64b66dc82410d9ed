"""Causal-LM generation on the ANE: ``compile_lm`` → ``CompiledLM`` (prefill + decode, KV cache as state).

Only what is specific to language models lives here: the step functions and the cache layout
(``cache.py``), the generation loop and the end-to-end token check (``generate.py``), and the front
end that asks the compile stages for the two functions (``compile.py``). Conversion, chunking,
compression and their quality are the stages' and the targets' (``anefx.core``, ``anefx.targets``).

Layering: this package is a front end; nothing below imports it.
"""

from anefx.lm.cache import CacheLayout
from anefx.lm.compile import CompiledLM, compile_lm
from anefx.lm.generate import EndToEndCheck, Generation, GenerationMismatch

__all__ = ["CacheLayout", "CompiledLM", "EndToEndCheck", "Generation", "GenerationMismatch", "compile_lm"]
