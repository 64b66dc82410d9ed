"""Benchmark: what anefx changes in the converted program, and what it costs.

    python examples/benchmark.py                         # stock DistilBERT, full size
    python examples/benchmark.py --models all            # the whole zoo, full size
    python examples/benchmark.py --models llama_small,opt_small,torch_encoder_small   # decoders, nn.Transformer*
    python examples/benchmark.py --memory --scaling      # the memory and depth-scaling checks
    python examples/benchmark.py --models none --diffusion --sd15   # diffusers components; SD-1.5's UNet chunked
    python examples/benchmark.py --models none --lm tiny_llama   # generation: compile_lm, prefill + decode
    python examples/benchmark.py --models none --lm smollm2      # the same with SmolLM2-135M-Instruct
    python examples/benchmark.py --models none --seq2seq whisper_base,whisper_large_v3   # encode + prefill + decode
    python examples/benchmark.py --models none --decode-traffic 512,2048,4096   # decode traffic vs context

For each model it prints, side by side, the op histogram of the stock conversion (the captured graph
handed to the converter with no anefx pass) and of anefx's, for Core ML (MIL ops) and, when the
``anefx[coreai]`` extra is installed, for Core AI, with conversion times; then coverage (the share of
the matmul-like FLOPs that end up as convolutions or per-head einsums, and what blocked the rest),
anefx's own time (capture excluded: passes + validation) against ``ct.convert``'s, every stage's time,
the layout changes (transposes + reshapes) of the stock and the anefx program, the largest activation
(fp16, padded as on the ANE), the largest numeric error and the process's peak memory. DistilBERT's row
also converts the Apple-style hand-written DistilBERT (``examples/ane_distilbert.py``) with coremltools
in the same run and compares anefx's end-to-end compile with it.

Each row also runs the shipped program (the converted ``.mlpackage``, fp16) with anefx's MIL
interpreter (``anefx.load``) against PyTorch eager on the same input: time and error; ``--lm`` times one
decode step of the saved package (prefill, then decode with the KV cache as state).

Targets: anefx end to end <= coremltools' conversion of the hand-written model; layout changes <= stock;
anefx's work <= 0.5x ``ct.convert``; no second copy of the weights during the rewrite
(extra memory <= 0.3x the weights, i.e. peak <= 1.3x, on a model of >= 300M parameters); anefx's
time linear in depth (12 vs 48 layers); the MIL interpreter runs full-size DistilBERT (S=128) in
<= 5x eager's time and one SmolLM2-135M decode step in < 1 s.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anefx
from examples import models

FULL_SIZE = {
    "distilbert": lambda attn: models.distilbert(attn=attn),
    "bert": lambda attn: models.bert(layers=12, dim=768, heads=12, seq=128, attn=attn),
    "vit": lambda attn: models.vit(layers=12, dim=768, heads=12, image=224, patch=16, attn=attn),
    "gpt2": lambda attn: models.gpt2(layers=12, dim=768, heads=12, seq=128, attn=attn),
    "t5_encoder": lambda attn: models.t5_encoder(layers=12, dim=768, heads=12, seq=128),
    "resnet50": lambda attn: models.resnet(depths=(3, 4, 6, 3), widths=(256, 512, 1024, 2048), image=224),
    "convnext": lambda attn: models.convnext(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768), image=224),
    "minilm": lambda attn: models.minilm(seq=128),
    # decoders (small configs, random weights): RoPE, GQA, RMSNorm, Qwen3's per-head QK-norm
    "llama_small": lambda attn: models.small_decoder("llama"),
    "qwen3_small": lambda attn: models.small_decoder("qwen3"),
    "mistral_small": lambda attn: models.small_decoder("mistral"),
    "neox_small": lambda attn: models.small_decoder("neox"),
    "opt_small": lambda attn: models.small_decoder("opt"),
    "llama_lm_small": lambda attn: models.small_decoder("llama_lm"),
    "torch_encoder_small": lambda attn: models.torch_encoder(),
    # image generation (diffusers, small configs, random weights): `--diffusion` adds per-block rows
    "clip_text_small": lambda attn: models.text_encoder(),
    "unet_small": lambda attn: models.unet(layers=2, latent=(32, 32)),
    "vae_decoder_small": lambda attn: models.vae_decoder(latent=(32, 32)),
    "vae_encoder_small": lambda attn: models.vae_encoder(image=(64, 64)),
    "dit_small": lambda attn: models.dit(layers=4),
    "pixart_small": lambda attn: models.pixart(layers=4),
    "sd3_small": lambda attn: models.sd3(layers=4),
}
DIFFUSION = ("clip_text_small", "unet_small", "vae_decoder_small", "vae_encoder_small", "dit_small", "pixart_small")
DIFFUSION += ("sd3_small",)
KEY_OPS = (
    "linear",
    "matmul",
    "conv",
    "einsum",
    "transpose",
    "reshape",
    "softmax",
    "layer_norm",
    "reduce_mean",
    "rsqrt",
)
NORM_OPS = ("layer_norm", "reduce_mean", "rsqrt", "pow")
MATMUL_LIKE = {"conv", "einsum", "linear", "matmul"}


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class RssSampler:
    """Peak resident memory over a block, sampled every 5 ms (Linux /proc; elsewhere ru_maxrss)."""

    def __enter__(self):
        self.peak = self.start = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    @staticmethod
    def _now() -> int:
        statm = Path("/proc/self/statm")
        if statm.exists():
            return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return int(peak_rss_mb() * 2**20)


def coverage(compiled) -> tuple[float, list[str]]:
    """Share of matmul-like FLOPs that are convolutions or einsums, and the ops that blocked the rest."""
    report = compiled.ane_report
    names = {f.op for f in report.findings}
    costs = [c for c in report.costs if c.op_type in MATMUL_LIKE]
    total = sum(c.flops for c in costs) or 1.0
    good = sum(c.flops for c in costs if c.op_type in ("conv", "einsum"))
    blocked = [
        f"{c.op_type} {c.name}" + (" (flagged)" if c.name in names else "")
        for c in costs
        if c.op_type in ("linear", "matmul")
    ]
    return good / total, blocked


LAYOUT_OPS = ("transpose", "reshape")


def layout_changes(hist) -> int:
    """Transposes + reshapes of a converted program (its pure layout changes)."""
    return sum(hist.get(op, 0) for op in LAYOUT_OPS)


def largest_activation(artifact) -> int:
    """Bytes of the largest fp16 activation of the program, the last axis padded to 64 bytes (ANE)."""
    from anefx.ane.rules import padded_bytes

    sizes = [
        padded_bytes(tuple(int(d) for d in out.shape))
        for op in artifact.operations()
        if op.op_type != "const"
        for out in op.outputs
        if getattr(out, "shape", None) is not None and all(isinstance(d, int) for d in out.shape)
    ]
    return max(sizes, default=0)


def reference_conversion() -> dict:
    """coremltools' conversion of the hand-written, Apple-style DistilBERT (examples/ane_distilbert.py):
    torch.export + run_decompositions + ct.convert with anefx's Core ML options, timed in this run."""
    import warnings

    import torch

    from anefx.compat.coremltools import coremltools_module, operations, quiet_coremltools
    from anefx.targets.coreml import CoreMLOptions
    from examples.ane_distilbert import ane_distilbert

    ct = coremltools_module()
    opts = CoreMLOptions()
    model, args, kwargs = ane_distilbert()
    t0 = time.perf_counter()
    ep = torch.export.export(model, args, kwargs, strict=False).run_decompositions({})
    t1 = time.perf_counter()
    with warnings.catch_warnings(), quiet_coremltools():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            ep,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, opts.minimum_deployment_target),
            compute_precision=ct.precision.FLOAT16,
            compute_units=getattr(ct.ComputeUnit, opts.compute_units),
            skip_model_load=True,
        )
    t2 = time.perf_counter()
    ops = [op.op_type for op in operations(mlmodel) if op.op_type != "const"]
    return {"export": t1 - t0, "ct_convert": t2 - t1, "total": t2 - t0, "ops": ops}


def _best_of(fn, repeat: int = 3) -> float:
    """The fastest of ``repeat`` calls (after one warm-up), in seconds: the least disturbed by other work."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interpreter_row(compiled, model, args, kwargs) -> dict:
    """The shipped fp16 program run by anefx's MIL interpreter against eager PyTorch, in this run."""
    import numpy as np
    import torch

    t0 = time.perf_counter()
    program = anefx.load(compiled)
    load = time.perf_counter() - t0
    feed = dict(zip(program.inputs(), [*args, *kwargs.values()]))
    times = {}
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):  # on a busy machine, torch's threads wait for each other
        torch.set_num_threads(n)
        try:
            with torch.no_grad():
                times[n] = (_best_of(lambda: model(*args, **kwargs)), _best_of(lambda: program(feed)))
        finally:
            torch.set_num_threads(threads)
    with torch.no_grad():
        want = model(*args, **kwargs)
    eager, interp = min(t[0] for t in times.values()), min(t[1] for t in times.values())
    out = next(iter(program(feed).values())).astype(np.float64)
    if hasattr(want, "to_tuple"):  # a transformers ModelOutput: its first field (hidden states, logits)
        want = want.to_tuple()
    want = (want[0] if isinstance(want, (tuple, list)) else want).double().numpy()
    error = float(np.abs(out - want).max() / np.abs(want).max())
    finite = bool(np.isfinite(out).all())
    return {"load": load, "eager": eager, "interp": interp, "times": times, "error": error, "finite": finite}


def artifact_rows(compiled) -> list[tuple[str, list[str]]]:
    """The artifact check's lines, each with the torch nodes the fp16 fallback put in fp32."""
    checks = compiled.report.artifact.values()  # artifact_lines gives one line per check, in this order
    fp32 = [(c.get("fallback") or {}).get("fp32_nodes", []) if isinstance(c, dict) else [] for c in checks]
    return list(zip(compiled.report.artifact_lines(), fp32, strict=True))


def bench(name: str, attn: str, coreai: bool) -> dict:
    model, args, kwargs = FULL_SIZE[name](attn)
    stock = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty())
    reference = reference_conversion() if name == "distilbert" else None
    compiled = anefx.compile(model, args, kwargs)
    total = compiled.timings["total"]  # the compile's own events
    share, blocked = coverage(compiled)
    extra = {}
    if coreai:
        for label, pipeline in (("stock_ai", anefx.Pipeline.empty()), ("anefx_ai", None)):
            c = anefx.compile(model, args, kwargs, pipeline=pipeline, target="coreai")
            extra[label] = c.op_histogram()
            extra[f"{label}_convert"] = c.timings["convert"]
    return extra | {
        "compiled": compiled,
        "stock_compiled": stock,
        "reference": reference,
        "timings": dict(compiled.timings),
        "largest": largest_activation(compiled.artifact),
        "stock_largest": largest_activation(stock.artifact),
        "name": f"{name} ({attn})",
        "stock": stock.op_histogram(),
        "anefx": compiled.op_histogram(),
        "passes": compiled.timings["passes"],
        "capture": compiled.timings["capture"],
        "convert": compiled.timings["convert"],
        "stock_convert": stock.timings["convert"],
        "total": total,
        "error": compiled.max_error(),
        "coverage": share,
        "blocked": blocked,
        "rolled_back": [r.name for r in compiled.report.rolled_back],
        "guard": compiled.report.guard_lines(),
        "artifact": artifact_rows(compiled),
        "interpreter": interpreter_row(compiled, model, args, kwargs),
    }


def _table(title: str, left: dict, right: dict, times: tuple[float, float] | None = None) -> None:
    ops = sorted(set(left) | set(right), key=lambda o: (o not in KEY_OPS, o))
    width = max([18, *(len(o) + 2 for o in ops)])
    print(f"{title:<{width}}{'stock':>8}{'anefx':>8}")
    for op in ops:
        print(f"{op:<{width}}{left.get(op, 0):>8}{right.get(op, 0):>8}")
    if times:
        print(f"{'convert (s)':<{width}}{times[0]:>8.2f}{times[1]:>8.2f}")


def print_result(r: dict) -> None:
    print(f"\n=== {r['name']} ===")
    _table("Core ML (MIL op)", r["stock"], r["anefx"], (r["stock_convert"], r["convert"]))
    if "anefx_ai" in r:
        print()
        _table("Core AI (op)", r["stock_ai"], r["anefx_ai"], (r["stock_ai_convert"], r["anefx_ai_convert"]))
    ratio = r["passes"] / r["convert"]
    verdict = "OK" if ratio <= 0.5 else "OVER TARGET"
    print(
        f"coverage: {r['coverage']:.1%} of matmul-like FLOPs as conv/einsum"
        + (f"; blocked: {r['blocked'][:5]}" if r["blocked"] else "")
    )
    print(
        f"anefx passes+validation {r['passes']:.2f}s vs ct.convert {r['convert']:.2f}s "
        f"(stock ct.convert {r['stock_convert']:.2f}s): ratio {ratio:.2f} [target <= 0.5: {verdict}]"
    )
    print(f"capture {r['capture']:.2f}s, whole compile {r['total']:.2f}s, max abs error {r['error']:.2e}")
    print("anefx stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()))
    stock_layout, anefx_layout = layout_changes(r["stock"]), layout_changes(r["anefx"])
    print(
        f"layout changes (transpose + reshape): stock {stock_layout}, anefx {anefx_layout} "
        f"[never worse than stock: {'OK' if anefx_layout <= stock_layout else 'WORSE'}]"
    )
    for line in r.get("guard", ()):  # the guard's estimate, and every region it kept in its original form
        print(line)
    for line, fp32 in r.get("artifact", ()):  # the shipped program run against the validated graph
        print(line)
        if fp32:
            print(f"  in fp32 (fp16 fallback): {', '.join(fp32)}")
    stock, ours = r["stock"], r["anefx"]
    if any(stock.get(op, 0) for op in ("reduce_mean", "rsqrt")):
        print(
            "norms: "
            + ", ".join(f"{op} {stock.get(op, 0)} -> {ours.get(op, 0)}" for op in NORM_OPS)
            + " (stock -> anefx)"
        )
    print(
        "stock / anefx, this run: "
        + ", ".join(
            f"{label} {stock_n}/{ours_n}" + (f" = {stock_n / ours_n:.1f}x" if ours_n else "")
            for label, stock_n, ours_n in (
                ("transposes", stock.get("transpose", 0), ours.get("transpose", 0)),
                ("reshapes", stock.get("reshape", 0), ours.get("reshape", 0)),
                (
                    "linear+matmul",
                    stock.get("linear", 0) + stock.get("matmul", 0),
                    ours.get("linear", 0) + ours.get("matmul", 0),
                ),
                ("non-const ops", sum(stock.values()), sum(ours.values())),
            )
        )
    )
    print(
        f"largest activation (fp16, last axis padded to 64 B): stock {r['stock_largest'] / 2**20:.2f} MiB, "
        f"anefx {r['largest'] / 2**20:.2f} MiB"
    )
    ref = r.get("reference")
    if ref:
        ok = r["total"] <= ref["total"]
        print(
            f"Apple-style hand-written DistilBERT (examples/ane_distilbert.py), coremltools in this run: "
            f"export {ref['export']:.2f}s + ct.convert {ref['ct_convert']:.2f}s = {ref['total']:.2f}s "
            f"({len(ref['ops'])} MIL ops); anefx end to end {r['total']:.2f}s: ratio {r['total'] / ref['total']:.2f} "
            f"[target <= 1: {'OK' if ok else 'OVER TARGET'}]"
        )
    if r["rolled_back"]:
        print(f"rolled back: {', '.join(r['rolled_back'])}")
    run = r["interpreter"]
    ratio = run["interp"] / run["eager"]
    per_threads = "; ".join(
        f"{n} thread{'s' if n > 1 else ''}: {i * 1e3:.0f} vs {e * 1e3:.0f} ms" for n, (e, i) in run["times"].items()
    )
    print(
        f"shipped program on the MIL interpreter (fp16) vs eager PyTorch, each at its fastest thread count: "
        f"{run['interp'] * 1e3:.0f} ms vs {run['eager'] * 1e3:.0f} ms: ratio {ratio:.2f} "
        f"[target <= 5: {'OK' if ratio <= 5 else 'OVER TARGET'}] ({per_threads}); "
        f"error vs eager {run['error']:.2e} of the output's scale"
        + ("" if run["finite"] else " [INF/NAN IN THE OUTPUT]")
        + f"; load {run['load']:.2f}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


def _block_of(node, depth: int) -> str:
    """The first ``depth`` levels of the module that made ``node`` (``down_blocks.0.attentions.0``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(top level)"
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").replace("L['self']", "")
    return ".".join(p for p in path.split(".")[:depth] if p) or "(top level)"


def layout_per_block(compiled, depth: int = 3) -> list[tuple[str, int, int]]:
    """Estimated transposes + reshapes (the guard's count of FX nodes that become MIL layout ops) per
    module block, in the captured (stock) graph and in anefx's."""

    from anefx.driver.guard import layout_change

    counts = {}
    for label, gm in (("stock", compiled.captured.graph_module), ("anefx", compiled.graph_module)):
        counts[label] = Counter()
        for n in gm.graph.nodes:
            if kinds := layout_change(n):
                counts[label][_block_of(n, depth)] += len(kinds)
    blocks = sorted(set(counts["stock"]) | set(counts["anefx"]))
    return [(b, counts["stock"][b], counts["anefx"][b]) for b in blocks]


def diffusion_section(names=DIFFUSION) -> None:
    """Image generation components: the rows of ``bench`` plus layout changes per block, the moving
    ones (that copy memory in the ANE's padded layout) and the ANE estimate (stock vs anefx)."""

    from rich.console import Console

    from anefx.ane.report import analyse, compare_estimates

    console = Console(width=160)
    for name in names:
        r = bench(name, "sdpa", False)
        print_result(r)
        compiled, stock = r["compiled"], r["stock_compiled"]
        print(f"layout changes per block ({name}, estimate from the FX graphs: block, stock, anefx):")
        for block, s_n, a_n in layout_per_block(compiled):
            print(f"  {block:<40}{s_n:>6}{a_n:>6}")
        reports = {
            "stock": analyse(stock.artifact, None, stock.graph_module, stock.captured.flat_inputs),
            "anefx": compiled.ane_report,
        }
        console.print(compare_estimates(reports))
        for label, report in reports.items():  # what the ANE rules flag, by rule and MIL op type
            flagged = Counter(f"{f.rule}: {f.op_type}" for f in report.findings)
            print(f"flagged ({label}): " + (", ".join(f"{k} x{v}" for k, v in sorted(flagged.items())) or "none"))


def findings(report) -> str:
    """An ANE report's findings by verdict and rule: what the rules say runs off the ANE (``off_ane``)
    apart from what they say runs slowly on it (``slow``: rank-5 tensors, padded last axes). A chain's
    report holds each chunk's (the integer position and mask arithmetic each decoder chunk redoes)."""
    by = {}
    for f in report.findings:
        by.setdefault(f.verdict, Counter())[f.rule] += 1
    if not by:
        return "none"
    return ", ".join(
        f"{verdict} {sum(c.values())} (" + ", ".join(f"{r} x{n}" for r, n in sorted(c.items())) + ")"
        for verdict, c in sorted(by.items())
    )


def sd15_unet(latent: int = 64, chunk_mb: float = 1000.0, queries: int = 512) -> None:
    """Stable Diffusion 1.5's UNet (860M parameters, random weights) at ``latent``x``latent`` latents,
    batch 2: compiled and chunked under ``chunk_mb``; compile time and peak memory. Attention score
    tensors are chunked by ``queries`` queries (Apple's ml-stable-diffusion uses 512)."""
    model, args, kwargs = models.unet_sd15(latent=(latent, latent))
    params = sum(p.numel() for p in model.parameters())
    tokens = latent * latent
    score_bytes = 2 * tokens * queries * 2  # batch 2, fp16: one query chunk's per-head scores
    pipeline = anefx.Pipeline.default().with_options("attention_chunks", max_bytes=score_bytes)
    gc.collect()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        compiled = anefx.compile(model, args, kwargs, pipeline=pipeline, max_chunk_mb=chunk_mb, progress=print)
        seconds = time.perf_counter() - t0
    print(f"\n=== SD-1.5 UNet: {params / 1e6:.0f}M parameters, latents {latent}x{latent}, batch 2 ===")
    print(f"attention_chunks max_bytes {score_bytes / 2**20:.0f} MiB ({queries} queries x {tokens} keys x batch 2)")
    sizes = [c.weight_bytes_estimate / 1e6 for c in compiled.chunks.chunks] if compiled.chunks else []
    print(f"compile {seconds:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in compiled.timings.items())})")
    print(f"peak RSS {rss.peak / 2**30:.2f} GiB (before {rss.start / 2**30:.2f} GiB)")
    print(f"chunks: {len(sizes)}, weights per chunk (MB): {[round(x) for x in sizes]} [cap {chunk_mb:.0f} MB]")
    for line in compiled.report.guard_lines():
        print(line)
    for line in compiled.report.artifact_lines():
        print(line)
    rec = compiled.report.record("attention_chunks")
    print(f"attention_chunks: {rec.stats}")
    ops = compiled.op_histogram()
    print(f"MIL (all chunks): {sum(ops.values())} ops; " + ", ".join(f"{k} {ops.get(k, 0)}" for k in KEY_OPS))


def memory_check() -> None:
    """A >= 300M-parameter model (BERT-large shape, from a config): extra memory of the rewrite."""
    model, args, kwargs = models.bert(layers=24, dim=1024, heads=16, seq=128)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    with RssSampler() as rss:
        compiled = anefx.compile(model, args, kwargs, convert=False)
    extra = (rss.peak - rss.start) / weights
    print(f"\n=== memory: {params / 1e6:.0f}M parameters, {weights / 2**30:.2f} GiB of weights ===")
    print(
        f"RSS before the rewrite {rss.start / 2**30:.2f} GiB, peak during it {rss.peak / 2**30:.2f} GiB: "
        f"extra {extra:.2f}x the weights [target <= 0.3x (peak <= 1.3x): {'OK' if extra <= 0.3 else 'OVER TARGET'}]"
    )
    print(f"passes+validation {compiled.timings['passes']:.1f}s, capture {compiled.timings['capture']:.1f}s")


def scaling_check() -> None:
    times = {}
    for layers in (12, 48):
        model, args, kwargs = models.bert(layers=layers, dim=256, heads=4, seq=128)
        compiled = anefx.compile(model, args, kwargs, convert=False)
        times[layers] = compiled.timings["passes"]
    ratio = times[48] / times[12]
    print(f"\n=== scaling: anefx passes+validation 12 layers {times[12]:.2f}s, 48 layers {times[48]:.2f}s ===")
    print(f"ratio {ratio:.2f} for 4x the depth [linear: <= 6: {'OK' if ratio <= 6 else 'SUPERLINEAR'}]")


LMS = {"tiny_llama": lambda: (models.tiny_llama_lm(), None), "smollm2": models.smollm2}


def bench_lm(name: str, context: int, prefill: int) -> None:
    """Generation: both functions' MIL histograms, state and weight bytes, a roofline ESTIMATE of the
    prefill latency and the decode tokens/s per chip."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from anefx.ane.estimate import CHIPS
    from anefx.cli import lm_table

    model, _tok = LMS[name]()
    lm = anefx.compile_lm(model, context_length=context, prefill_length=prefill, check_tokens=8)
    seconds = lm.timings["total"]
    console = Console(width=160)
    console.print(
        f"\n[bold]{name}: compile_lm (context {lm.context_length}, prefill {prefill})[/bold] in {seconds:.1f} s"
    )
    for table in lm_table(lm):
        console.print(table)
    console.print(f"state bytes (fp16): {lm.layout.state_bytes():,}; weight bytes (package): {lm.weight_bytes():,}")
    console.print(str(lm.check))
    reports = {fn: lm.ane_report(fn) for fn in lm.functions}
    est = Table(
        title="ESTIMATE (roofline from published peak figures, not a measurement): per-op max(FLOPs/peak, "
        "activation bytes/bandwidth), plus the weights and the KV cache streamed once per call"
    )
    est.add_column("chip")
    est.add_column(f"prefill {prefill} tokens (ms)", justify="right")
    est.add_column("decode (ms/token)", justify="right")
    est.add_column("decode (tokens/s)", justify="right")
    streamed = lm.weight_bytes() + lm.layout.state_bytes()
    for chip, spec in CHIPS.items():
        memory_ms = streamed / (spec.bandwidth_gbs * 1e9) * 1e3
        p_ms = reports["prefill"].estimate["ms_per_chip"][chip] + memory_ms
        d_ms = reports["decode"].estimate["ms_per_chip"][chip] + memory_ms
        est.add_row(chip, f"{p_ms:.3f}", f"{d_ms:.3f}", f"{1000 / d_ms:.0f}")
    console.print(est)
    console.print("ANE report findings: " + "; ".join(f"{fn}: {findings(r)}" for fn, r in reports.items()))
    for fn in lm.functions:
        console.print(escape(str(lm.traffic(fn))))
    interpreter_decode(lm, console)


#: encoder-decoder generation (compile_lm on config.is_encoder_decoder): factory, compile_lm keywords
SEQ2SEQ = {
    "whisper_tiny_random": lambda: (models.tiny_whisper(frames=100), {}),
    "whisper_base": lambda: (models.whisper_sized("base"), {}),
    "whisper_large_v3": lambda: (models.whisper_sized("large-v3"), {"validate": "example"}),
    "t5_small_random": lambda: (models.tiny_t5(), {"source_length": 20}),
    "bart_small_random": lambda: (models.tiny_bart(), {"source_length": 20}),
}


def bench_seq2seq(name: str, context: int | None = None) -> dict:
    """Encoder-decoder generation: compile time and peak memory, the three functions' MIL
    histograms, state bytes, and each function's memory-traffic ESTIMATE against its floor (weights
    and states read once; :meth:`~anefx.core.result.Compiled.traffic`, as for causal LMs)."""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=160)
    gc.collect()
    t0 = time.perf_counter()
    model, kwargs = SEQ2SEQ[name]()
    params = sum(p.numel() for p in model.parameters())
    build = time.perf_counter() - t0
    with RssSampler() as rss:
        lm = anefx.compile_lm(model, context_length=context, check_tokens=4, **kwargs)
    seconds = lm.timings["total"]
    layers = len(lm.layout.decoder.layers)
    console.print(
        escape(
            f"\n{name}: compile_lm, {params / 1e6:.0f}M parameters, {lm.layout.source.name} "
            f"{list(lm.layout.source.shape)}, encoder {lm.layout.encoder_length} positions (cross states "
            f"{lm.layout.cross_length}), decoder context {lm.context_length}, {layers} decoder layers"
            + (f", {kwargs}" if kwargs else "")
        )
    )
    console.print(
        f"compile {seconds:.1f} s (model built in {build:.1f} s); peak RSS {rss.peak / 2**20:,.0f} MiB "
        f"(+{(rss.peak - rss.start) / 2**20:,.0f} MiB during the compile); {lm.check}"
    )
    stages = {k: v for k, v in lm.timings.items() if "." not in k and k != "total"}
    console.print("stages (s): " + ", ".join(f"{k}={v:.1f}" for k, v in stages.items()))
    if lm.artifact.chunked:  # above the target's package size: the encoder in chunks of its own
        console.print(
            f"chain of {len(lm.artifact.chunks)} packages (max_chunk_mb={lm.artifact.cap_mb:g}): "
            + "; ".join(
                f"chunk{c.index} stages {c.layers[0]}-{c.layers[-1]} {'+'.join(c.functions)} "
                f"{c.package.weight_bytes() / 2**20:,.0f} MiB"
                for c in lm.artifact.chunks
            )
        )
    table = Table(title="MIL ops per function")
    table.add_column("op")
    hists = {fn: lm.op_histogram(fn) for fn in lm.functions}
    for fn in lm.functions:
        table.add_column(fn, justify="right")
    for op in sorted(set().union(*hists.values()), key=lambda o: (-hists["decode"][o], o)):
        table.add_row(op, *(str(hists[fn][op]) for fn in lm.functions))
    console.print(table)
    states = lm.layout.state_bytes()
    console.print(
        "states (fp16): "
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in states.items())
        + f"; weights (package) {lm.weight_bytes() / 2**20:.1f} MiB"
    )
    decode = hists["decode"]
    console.print(
        f"decode layout changes: {decode['transpose']} transposes + {decode['reshape']} reshapes for {layers} "
        f"decoder layers; state writes (self caches, cross states, mask): encode "
        f"{hists['encode']['coreml_update_state']}, decode {decode['coreml_update_state']}; decode state reads "
        f"{decode['read_state']}"
    )
    traffic = {fn: lm.traffic(fn) for fn in lm.functions}  # the causal-LM rows' estimate (anefx/ane/traffic.py)
    for fn in lm.functions:
        console.print(escape(str(traffic[fn])))
    decode_traffic = traffic["decode"]
    top = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in list(decode_traffic.by_op_type().items())[:6])
    console.print(escape(f"    decode by MIL op type (MB): {top}"))
    console.print("ANE report findings: " + "; ".join(f"{fn}: {findings(lm.ane_report(fn))}" for fn in lm.functions))
    result = {
        "name": name,
        "seconds": seconds,
        "peak_mib": rss.peak / 2**20,
        "ops": hists,
        "state_bytes": states,
        "traffic": {fn: t.to_dict() for fn, t in traffic.items()},
    }
    del lm, model
    gc.collect()
    torch.set_num_threads(torch.get_num_threads())
    return result


def decode_traffic_section(contexts=(512, 2048, 4096), prefill: int = 64) -> None:
    """The small Llama of issue 22 (hidden 256, 4 heads, 2 KV heads, 4 layers) compiled at each
    context: compile time, peak memory, each function's memory-traffic ESTIMATE against its floor
    (weights + KV cache read once), and the bytes that grow with the context between consecutive
    contexts against the size of the KV cache."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=170)
    table = Table(title="decode at the bandwidth floor: small Llama, ESTIMATE (static, see anefx/ane/traffic.py)")
    for col in ("context", "compile (s)", "peak RSS (MiB)", "check", "decode MB", "x floor", "prefill MB", "floor MB"):
        table.add_column(col, justify="right")
    compiled = []
    for context in contexts:
        with RssSampler() as rss:
            t0 = time.perf_counter()
            lm = anefx.compile_lm(
                models.small_llama_lm(), context_length=context, prefill_length=prefill, check_tokens=8
            )
            seconds = time.perf_counter() - t0
        decode, pre = lm.traffic("decode"), lm.traffic("prefill")
        table.add_row(
            str(context),
            f"{seconds:.0f}",
            f"{rss.peak / 2**20:.0f}",
            "equal" if lm.check.tokens_equal else "DIFFER",
            f"{decode.total / 1e6:.1f}",
            f"{decode.total / decode.floor:.2f}",
            f"{pre.total / 1e6:.1f}",
            f"{decode.floor / 1e6:.1f}",
        )
        compiled.append(lm)
    console.print(table)
    for short, long in itertools.pairwise(compiled):
        for fn in ("decode", "prefill"):
            growth = long.context_growth(short, fn)
            console.print(escape(str(growth)))
            top = ", ".join(f"{k} {v}" for k, v in list(growth.to_dict()["growing_by_op_type_mb"].items())[:4])
            console.print(escape(f"    growing by MIL op type (MB): {top}"))


def interpreter_decode(lm, console) -> None:
    """The saved package on anefx's MIL interpreter: one prefill, then the time of one decode step
    (fastest of 5), with torch's threads and with one thread (on a busy machine, torch's OpenMP
    threads wait for each other at every small op), and the logit error of the first decoded token
    against the rewritten graphs."""
    import numpy as np
    import torch
    from rich.markup import escape

    t0 = time.perf_counter()
    program = anefx.load(lm)
    load = time.perf_counter() - t0
    prompt = list(range(3, 3 + min(8, lm.prefill_length)))
    reference = lm.generate(prompt, 2, eos_token_id=None)
    state = program.make_state("prefill")
    pad = lm.prefill_length - len(prompt)  # padded in front, negative positions: the last position is the prompt's
    ids = [[0] * pad + prompt]
    positions = [list(range(-pad, len(prompt)))]
    t0 = time.perf_counter()
    logits = program({"input_ids": ids, "position_ids": positions}, function="prefill", state=state)["logits"]
    prefill = time.perf_counter() - t0
    last = logits[0, -1].astype(np.float64)
    want = reference.logits[0].double().numpy()
    error = float(np.abs(last - want).max() / np.abs(want).max())
    token, position = reference.new_tokens[0], len(prompt)

    def step():  # each step rewrites the same cache slot: the state stays that of one decoded token
        program({"input_ids": [[token]], "position_ids": [[position]]}, function="decode", state=state)

    threads = torch.get_num_threads()
    decode = _best_of(step, 5)
    torch.set_num_threads(1)
    try:
        decode_one = _best_of(step, 5)
    finally:
        torch.set_num_threads(threads)
    best = min(decode, decode_one)
    console.print(
        escape(
            f"MIL interpreter, saved package (fp16): load {load:.2f} s, prefill {lm.prefill_length} tokens "
            f"{prefill * 1e3:.0f} ms; one decode step {decode * 1e3:.0f} ms ({threads} threads), "
            f"{decode_one * 1e3:.0f} ms (1 thread) [target < 1 s: {'OK' if best < 1 else 'OVER TARGET'}]; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; first-token logits vs the "
            f"rewritten graphs: {error:.2e} of their scale, greedy token "
            f"{'equal' if int(np.argmax(last)) == token else 'DIFFERENT'}"
        )
    )


from anefx.lm.generate import DEFAULT_TEXT_PROMPTS as COMPRESSION_PROMPTS  # noqa: E402  (the CLI's set)


def compression_section(schemes=("lut6", "lut4", "int8"), new_tokens: int = 64, chunk_mb: float = 100.0) -> None:
    """SmolLM2-135M-Instruct: size vs quality per compression scheme, and a chunked compile.

    One fp16 compile (full-sequence forward, ``use_cache=False``, iOS18); each scheme is applied to its
    converted program (``CompiledModel.with_compression``). Quality is anefx's own measurement on the
    shipped weights: teacher-forced next-token agreement with the fp16 package and mean KL over
    ``new_tokens`` continuation tokens of 4 chat prompts (continuations: HF greedy decoding of the
    original model). Sizes are the saved packages' weight files. Then ``max_chunk_mb=chunk_mb``: chunk
    sizes, and the chained chunks' greedy tokens against the unchunked graph's."""
    import tempfile

    import torch
    from rich.console import Console
    from rich.table import Table

    from anefx.targets.coreml import CoreMLOptions, package_weight_bytes

    model, tok = models.smollm2_model_and_tokenizer()
    model.config.use_cache = False
    prompts = [models.smollm2_chat_ids(tok, p) for p in COMPRESSION_PROMPTS]
    with torch.no_grad():
        sequences = [
            model.generate(
                p,
                attention_mask=torch.ones_like(p),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tok.eos_token_id,
            )
            for p in prompts
        ]
    length = max(s.shape[1] for s in sequences)
    ids = torch.zeros(1, length, dtype=torch.long)
    mask = torch.ones(1, length, dtype=torch.long)
    fp16 = anefx.compile(
        model, (ids,), {"attention_mask": mask}, target_options=CoreMLOptions(minimum_deployment_target="iOS18")
    )
    print(f"fp16 compile: {fp16.timings['total']:.0f} s {dict((k, round(v)) for k, v in fp16.timings.items())}")
    out = Path(tempfile.mkdtemp(prefix="anefx-bench-"))
    fp16_bytes = package_weight_bytes(fp16.save(out / "fp16.mlpackage"))
    table = Table(title=f"SmolLM2-135M-Instruct compression ({len(prompts)} prompts x {new_tokens} tokens)")
    for col in ("scheme", "weights MB", "x fp16", "agreement", "mean KL", "max KL", "e2e rel err", "compress s"):
        table.add_column(col, justify="right")
    table.add_row("fp16", f"{fp16_bytes / 1e6:.1f}", "1.000", "-", "-", "-", "-", "-")
    for scheme in schemes:
        c = fp16.with_compression(scheme)
        seconds = c.compression.seconds
        size = package_weight_bytes(c.save(out / f"{scheme}.mlpackage"))
        lm = c.lm_quality(prompts, new_tokens, sequences=sequences)
        q = c.compression.quality
        table.add_row(
            scheme,
            f"{size / 1e6:.1f}",
            f"{size / fp16_bytes:.3f}",
            f"{lm.agreement:.3f}",
            f"{lm.mean_kl:.4f}",
            f"{lm.max_kl:.3f}",
            f"{q.end_to_end_rel_error:.3g}",
            f"{seconds:.0f}",
        )
        print(f"{scheme}: {q.summary()} first disagreement per prompt {lm.first_disagreement}", flush=True)
        del c
        gc.collect()
    Console(width=160).print(table)

    chunked = anefx.compile(model, (ids,), {"attention_mask": mask}, max_chunk_mb=chunk_mb)
    folder = chunked.save(out / "chunked")
    sizes = [
        package_weight_bytes(folder / c["file"]) / 1e6
        for c in __import__("json").loads((folder / "manifest.json").read_text())["chunks"]
    ]
    print(
        f"max_chunk_mb={chunk_mb:g}: {len(sizes)} packages of {', '.join(f'{s:.1f}' for s in sizes)} MB "
        f"(compiled in {chunked.timings['total']:.0f} s)"
    )
    agree = total = 0
    worst = 0.0
    for seq, p in zip(sequences, prompts, strict=True):
        padded = torch.zeros(1, length, dtype=torch.long)
        padded[0, : seq.shape[1]] = seq[0]
        out = fp16(padded, attention_mask=mask)
        whole = (out.logits if hasattr(out, "logits") else out[0])[0]
        chain = chunked.chunks.run([padded, mask])[0][0]
        n = seq.shape[1]
        a, b = whole[p.shape[1] - 1 : n - 1].argmax(-1), chain[p.shape[1] - 1 : n - 1].argmax(-1)
        agree += int((a == b).sum())
        total += n - p.shape[1]
        worst = max(worst, float((whole[:n] - chain[:n]).abs().max()))
    print(f"chained chunks vs unchunked graph: {agree}/{total} identical next tokens, max |logit diff| {worst:.2e}")


def _scheme(spec: str):
    """``lut6`` or ``lut6:per_tensor`` / ``lut6:g128`` (granularity or group size) → compression option."""
    from anefx.targets.compression import CompressionOptions

    scheme, _, detail = spec.partition(":")
    if not detail:
        return scheme
    if detail.startswith("g"):
        return CompressionOptions(scheme=scheme, group_size=int(detail[1:]))
    return CompressionOptions(scheme=scheme, granularity=detail)


def lm_compression_section(
    schemes=("lut6", "lut4", "int8"), new_tokens: int = 64, context: int = 128, prefill: int = 64, chunk_mb=None
) -> None:
    """SmolLM2-135M-Instruct through ``compile_lm``: size vs quality per compression scheme.

    One fp16 compile (prefill + decode, KV states); each scheme is applied to its converted functions
    (``CompiledLM.with_compression``: both functions, shared tables, one weight file). Quality is
    anefx's own measurement on the shipped weights (``CompiledLM.compression.lm``): teacher-forced
    greedy-token agreement with the fp16 weights and mean KL over ``new_tokens`` tokens of 4 chat
    prompts. Sizes are the saved packages' weight files. With ``chunk_mb``: a chunked compile, its
    package sizes, and its greedy tokens against the unchunked compile's."""
    import json
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from anefx.lm.compile import measure
    from anefx.targets.coreml import package_weight_bytes

    model, tok = models.smollm2_model_and_tokenizer()
    prompts = [models.smollm2_chat_ids(tok, p) for p in COMPRESSION_PROMPTS]
    out = Path(tempfile.mkdtemp(prefix="anefx-bench-lm-"))
    convert = bool(schemes)  # the chunk comparison alone needs only the unchunked torch graphs
    fp16 = anefx.compile_lm(model, context_length=context, prefill_length=prefill, check_tokens=8, convert=convert)
    print(f"compile_lm fp16: {fp16.timings['total']:.0f} s {dict((k, round(v)) for k, v in fp16.timings.items())}")
    fp16_bytes = package_weight_bytes(fp16.save(out / "fp16.mlpackage")) if convert else 0
    table = Table(
        title=f"SmolLM2-135M-Instruct compile_lm compression ({len(prompts)} prompts x {new_tokens} new tokens, "
        "agreement and KL against the fp16 weights)"
    )
    for col in ("scheme", "weights MB", "x fp16", "agreement", "mean KL", "max KL", "compress s", "quality s"):
        table.add_column(col, justify="right")
    table.add_row("fp16", f"{fp16_bytes / 1e6:.1f}", "1.000", "-", "-", "-", "-", "-")
    for spec in schemes:
        c = fp16.with_compression(_scheme(spec), new_tokens=0)
        compress_s = c.compression.seconds
        size = package_weight_bytes(c.save(out / f"{spec.replace(':', '_')}.mlpackage"))
        hist = c.op_histogram("decode")
        t0 = time.perf_counter()
        lm = measure(c, prompts, new_tokens)
        quality_s = time.perf_counter() - t0
        table.add_row(
            spec,
            f"{size / 1e6:.1f}",
            f"{size / fp16_bytes:.3f}",
            f"{lm.agreement:.3f}",
            f"{lm.mean_kl:.4f}",
            f"{lm.max_kl:.3f}",
            f"{compress_s:.0f}",
            f"{quality_s:.0f}",
        )
        compressed_ops = {k: v for k, v in hist.items() if k.startswith("constexpr")}
        print(
            f"{spec}: {c.compression.summary()} decode constexpr ops {compressed_ops} "
            f"first disagreement per prompt {lm.first_disagreement}",
            flush=True,
        )
        del c
        gc.collect()
    if schemes:
        Console(width=160).print(table)
    if chunk_mb:
        chunked = anefx.compile_lm(
            model, context_length=context, prefill_length=prefill, check_tokens=8, max_chunk_mb=chunk_mb
        )
        folder = chunked.save(out / "chunked")
        manifest = json.loads((folder / "manifest.json").read_text())
        sizes = [package_weight_bytes(folder / c["file"]) / 1e6 for c in manifest["chunks"]]
        print(
            f"compile_lm max_chunk_mb={chunk_mb:g}: {len(sizes)} packages of {', '.join(f'{s:.1f}' for s in sizes)} MB "
            f"(compiled in {chunked.timings['total']:.0f} s)"
        )
        same = total = 0
        for p in prompts:
            a = fp16.generate(p, new_tokens, eos_token_id=None).new_tokens
            b = chunked.generate(p, new_tokens, eos_token_id=None).new_tokens
            same += sum(x == y for x, y in zip(a, b, strict=True))
            total += len(a)
        print(f"chained chunks vs unchunked compile_lm: {same}/{total} identical greedy tokens; {chunked.check}")
        for c in chunked.chunks.chunks:
            print(
                f"  chunk{c.index}: layers {c.layers[0] if c.layers else '-'}..{c.layers[-1] if c.layers else '-'}, "
                f"{len(c.states)} states, decode inputs {c.value_inputs('decode')}"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="distilbert", help=f"comma-separated from {sorted(FULL_SIZE)}, or 'all'")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-coreai", action="store_true", help="skip the Core AI conversions")
    ap.add_argument("--memory", action="store_true", help="the >= 300M-parameter memory check")
    ap.add_argument("--scaling", action="store_true", help="the 12 vs 48 layers time check")
    ap.add_argument("--lm", default="", help=f"generation section for these causal LMs: {sorted(LMS)}")
    ap.add_argument("--lm-context", type=int, default=256)
    ap.add_argument("--lm-prefill", type=int, default=64)
    ap.add_argument("--seq2seq", default="", help=f"encoder-decoder generation: {sorted(SEQ2SEQ)}")
    ap.add_argument(
        "--seq2seq-context", type=int, default=None, help="decoder context (default: 512, at most the model's)"
    )
    ap.add_argument("--compression", action="store_true", help="SmolLM2: size vs quality per scheme, chunking")
    ap.add_argument(
        "--lm-compression",
        default="",
        help="SmolLM2 compile_lm: comma-separated schemes (lut6, lut4, int8, lut6:per_tensor, lut6:g128)",
    )
    ap.add_argument("--lm-chunk-mb", type=float, default=None, help="SmolLM2 compile_lm: a chunked compile too")
    ap.add_argument(
        "--decode-traffic",
        default="",
        help="the small Llama at these contexts (e.g. 512,2048,4096): compile time, peak memory, traffic ESTIMATE",
    )
    ap.add_argument("--diffusion", action="store_true", help="image generation components, with per-block rows")
    ap.add_argument("--sd15", action="store_true", help="Stable Diffusion 1.5's UNet (random weights), chunked")
    ap.add_argument("--sd15-latent", type=int, default=64, help="its latent size (64: 4,096 tokens)")
    args = ap.parse_args(argv)
    from anefx.targets import coreai

    use_coreai = not args.no_coreai and coreai.available()[0]
    if not args.no_coreai and not use_coreai:
        print(f"(Core AI columns skipped: {coreai.available()[1]})")
    names = sorted(FULL_SIZE) if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    names = [] if args.models == "none" else names
    for name in names:
        print_result(bench(name, args.attn, use_coreai))
    for name in [n.strip() for n in args.lm.split(",") if n.strip()]:
        bench_lm(name, args.lm_context, args.lm_prefill)
    for name in [n.strip() for n in args.seq2seq.split(",") if n.strip()]:
        bench_seq2seq(name, args.seq2seq_context)
    if args.decode_traffic:
        decode_traffic_section(tuple(int(c) for c in args.decode_traffic.split(",")))
    if args.diffusion:
        diffusion_section()
    if args.sd15:
        sd15_unet(args.sd15_latent)
    if args.memory:
        memory_check()
    if args.scaling:
        scaling_check()
    if args.compression:
        compression_section()
    if args.lm_compression or args.lm_chunk_mb:
        schemes = [x.strip() for x in args.lm_compression.split(",") if x.strip()]
        lm_compression_section(schemes, chunk_mb=args.lm_chunk_mb)
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
