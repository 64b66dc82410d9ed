"""Speech to text on the ANE: a small Whisper compiled into ``encode`` + ``prefill`` + ``decode``.

    python examples/speech_to_text.py --out out/whisper_tiny.mlpackage

Synthetic audio (a chirp and two tones in noise, 16 kHz) → ``WhisperFeatureExtractor`` (80 log-mel
bins) → the compiled package: ``encode`` once (the encoder and every decoder layer's cross-attention
K/V, written into states), the start tokens prefilled, one ``decode`` per token. The model is a
small random-weight ``WhisperForConditionalGeneration`` (no trained checkpoint is at hand offline),
so the tokens are not words; what the example shows is that the package, run by anefx's MIL
interpreter (fp16, as it ships), produces the tokens ``model.generate()`` produces.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from models import tiny_whisper

import anefx

SAMPLE_RATE = 16_000


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp (200 → 2,000 Hz), two steady tones and a little noise, float32 in [-1, 1]."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chirp = np.sin(2 * math.pi * (200 * t + (2000 - 200) / (2 * seconds) * t**2))
    tones = 0.5 * np.sin(2 * math.pi * 440 * t) + 0.3 * np.sin(2 * math.pi * 1320 * t) * (t > seconds / 2)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    audio = 0.4 * chirp + 0.3 * tones + noise
    return (audio / np.abs(audio).max()).astype(np.float32)


def features(audio: np.ndarray, chunk_seconds: int) -> torch.Tensor:
    """80 log-mel bins of ``audio`` padded to ``chunk_seconds`` (100 frames a second), as Whisper's
    feature extractor makes them."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=chunk_seconds)
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/whisper_tiny.mlpackage")
    ap.add_argument("--seconds", type=float, default=0.8, help="length of the synthetic audio")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    chunk = 1  # seconds of audio the encoder takes: 100 mel frames, 50 encoder positions
    model = tiny_whisper(frames=100 * chunk)
    feats = features(synthetic_audio(args.seconds), chunk)
    print(f"audio {args.seconds:g} s → features {tuple(feats.shape)} (80 log-mel bins)")

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = anefx.compile_lm(model, context_length=64)
    seconds = time.perf_counter() - start
    print(f"compiled in {seconds:.1f} s: functions {lm.functions}; {lm.check}")
    for fn in lm.functions:
        ops = lm.op_histogram(fn)
        print(f"  {fn}: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
    state_bytes = lm.layout.state_bytes()
    print("state bytes (fp16): " + ", ".join(f"{k}={v:,}" for k, v in state_bytes.items()))

    out = lm.generate(feats, max_new_tokens=args.new_tokens, runtime="target")  # the package, fp16
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reference = model.generate(feats, max_new_tokens=args.new_tokens, do_sample=False)
    ref_tokens = [int(t) for t in reference[0, -len(out.new_tokens) :]]
    print(f"package tokens:   {out.new_tokens}")
    print(f"generate() tokens: {ref_tokens}  ({'equal' if out.new_tokens == ref_tokens else 'DIFFER'})")

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lm.save(path)
    print(f"wrote {path}")
    return {
        "compile_seconds": seconds,
        "tokens": out.new_tokens,
        "reference": ref_tokens,
        "ops": {fn: dict(lm.op_histogram(fn)) for fn in lm.functions},
        "state_bytes": state_bytes,
        "path": str(path),
        "model": model,
        "compiled": lm,
    }


if __name__ == "__main__":
    result = main()
    raise SystemExit(0 if result["tokens"] == result["reference"] else 1)
