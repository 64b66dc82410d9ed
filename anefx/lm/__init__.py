"""Generation on the ANE: ``compile_lm`` → ``CompiledLM`` (causal LMs: prefill + decode, KV cache as
state) or ``CompiledEncoderDecoder`` (Whisper, T5, BART …: encode + prefill + decode, self- and
cross-attention states).

Only what is specific to language models lives here: the step functions and the cache layout
(``cache.py``; ``encoder_decoder.py`` for encoder-decoder models), the generation loop and the
end-to-end token check (``generate.py``; start tokens and logits processors as ``generate()`` applies
them: ``processors.py``), and the front ends that ask the compile stages for the functions
(``compile.py``, ``seq2seq.py``). Conversion, chunking, compression and their quality are the stages'
and the targets' (``anefx.core``, ``anefx.targets``).

Layering: this package is a front end; nothing below imports it.
"""

from anefx.lm.cache import CacheLayout
from anefx.lm.compile import CompiledLM, compile_lm
from anefx.lm.generate import EndToEndCheck, Generation, GenerationMismatch
from anefx.lm.seq2seq import CompiledEncoderDecoder

__all__ = [
    "CacheLayout",
    "CompiledEncoderDecoder",
    "CompiledLM",
    "EndToEndCheck",
    "Generation",
    "GenerationMismatch",
    "compile_lm",
]
