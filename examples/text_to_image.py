"""Text to image with anefx's compiled components: a CLIP text encoder, a UNet and a VAE decoder (small
random-weight diffusers/transformers models by default), a diffusers scheduler, classifier-free
guidance (batch 2), and a PNG at the end.

Random weights make noise: the point is that the whole flow runs on anefx's rewritten graphs, and
that it computes what the original components compute (``--check`` runs the same loop on them).

    python examples/text_to_image.py --out out/t2i                # 16x16 latents, 4 steps
    python examples/text_to_image.py --latent 64 --out out/t2i64  # 64x64 latents: 4,096 tokens, query chunks

Each component is compiled with ``anefx.compile`` and saved as ``<out>/<name>.mlpackage`` (Core ML
runs them on macOS); the loop runs the compiled graphs in PyTorch, which is what anefx validated.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anefx
from examples import models

TEXT_TOKENS = 77


def tokenize(prompts: list[str], vocab: int = 1000, length: int = TEXT_TOKENS) -> torch.Tensor:
    """A stand-in for CLIP's tokenizer (nothing is downloaded): the prompt's bytes as ids between a
    start (0) and an end (2) token, padded with the end token to ``length``."""
    rows = []
    for p in prompts:
        ids = [0, *[3 + b % (vocab - 3) for b in p.encode()][: length - 2], 2]
        rows.append(ids + [2] * (length - len(ids)))
    return torch.tensor(rows)


@dataclass
class Components:
    """The models of a text-to-image pipeline and the example inputs each is compiled with."""

    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae_decoder: torch.nn.Module
    scheduler: object
    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    #: VAE latent scaling (Stable Diffusion's 0.18215)
    scaling: float = 0.18215


def build(latent: int = 16, unet_layers: int = 1) -> Components:
    """Small random-weight components: text encoder (width 32), UNet (two resolutions, cross-attention
    to 77 text tokens), VAE decoder; a DDIM scheduler with Stable Diffusion's noise schedule."""
    from diffusers import DDIMScheduler

    text, text_args, _ = models.text_encoder(batch=2)
    unet, unet_args, _ = models.unet(layers=unet_layers, latent=(latent, latent), batch=2)
    vae, vae_args, _ = models.vae_decoder(latent=(latent, latent), batch=1)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    inputs = {
        "text_encoder": (text_args, {}),
        "unet": (unet_args, {"return_dict": False}),
        "vae_decoder": (vae_args, {}),
    }
    return Components(text, unet, vae, scheduler, inputs)


def compile_components(
    parts: Components, *, convert: bool = True, unet_pipeline: anefx.Pipeline | None = None, progress=None
) -> dict[str, anefx.CompiledModel]:
    """``anefx.compile`` on each component with its example inputs."""
    compiled = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        args, kwargs = parts.inputs[name]
        pipeline = unet_pipeline if name == "unet" else None
        t0 = time.perf_counter()
        compiled[name] = anefx.compile(getattr(parts, name), args, kwargs, convert=convert, pipeline=pipeline)
        if progress:
            progress(f"{name}: compiled in {time.perf_counter() - t0:.1f}s")
    return compiled


def generate(
    text_encoder, unet, vae_decoder, scheduler, prompt: str, *, steps: int = 4, guidance: float = 7.5, seed: int = 0,
    latent: int = 16, scaling: float = 0.18215,
) -> torch.Tensor:  # fmt: skip
    """The text-to-image loop with classifier-free guidance; returns the image (1, 3, H, W) in [-1, 1].

    ``text_encoder``, ``unet`` and ``vae_decoder`` are callables: compiled models or the originals."""
    with torch.no_grad():
        states = text_encoder(tokenize(["", prompt]))  # (2, 77, C): unconditional, conditional
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 4, latent, latent, generator=gen) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = unet(x, t.reshape(1).expand(2), states, return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return vae_decoder(latents / scaling).clamp(-1, 1)


def save_png(image: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    pixels = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16, help="latent size (64: 4,096 tokens, Stable Diffusion's 512px)")
    ap.add_argument("--unet-layers", type=int, default=1)
    ap.add_argument("--chunk-mb", type=float, default=None, help="attention_chunks' max score tensor (MiB)")
    ap.add_argument("--out", type=Path, default=Path("out/text_to_image"))
    ap.add_argument("--no-convert", action="store_true", help="compile without the Core ML conversion")
    ap.add_argument("--check", action="store_true", help="run the same loop on the original components too")
    args = ap.parse_args(argv)

    parts = build(args.latent, args.unet_layers)
    pipeline = None
    if args.chunk_mb is not None:
        pipeline = anefx.Pipeline.default().with_options("attention_chunks", max_bytes=int(args.chunk_mb * 2**20))
    compiled = compile_components(parts, convert=not args.no_convert, unet_pipeline=pipeline, progress=print)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, c in compiled.items():
        guard = c.report.guard_lines()  # the counts, then any kept region or the form shipped
        print(f"{name}: {guard[0] if guard else ''}")
        for line in [*guard[1:], *c.report.artifact_lines()]:
            print(f"  {line}")
        chunks = [r for r in c.report.records if r.name == "attention_chunks" and r.modified]
        if chunks:
            print(f"  attention_chunks: {chunks[0].stats}")
        if not args.no_convert:
            ops = c.op_histogram()
            print(
                f"  MIL: {sum(ops.values())} ops, transpose {ops.get('transpose', 0)}, reshape {ops.get('reshape', 0)}"
            )
            c.save(args.out / f"{name}.mlpackage")
    t0 = time.perf_counter()
    loop = dict(steps=args.steps, latent=args.latent, scaling=parts.scaling)
    image = generate(
        compiled["text_encoder"], compiled["unet"], compiled["vae_decoder"], parts.scheduler, args.prompt, **loop
    )
    print(f"{args.steps} steps on the compiled graphs: {time.perf_counter() - t0:.1f}s")
    print(f"wrote {save_png(image, args.out / 'image.png')} ({image.shape[-1]}x{image.shape[-2]})")
    if args.check:
        ref = generate(parts.text_encoder, parts.unet, parts.vae_decoder, parts.scheduler, args.prompt, **loop)
        print(f"largest pixel difference against the original components: {float((image - ref).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
