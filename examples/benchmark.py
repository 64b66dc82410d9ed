"""Benchmark: what anefx changes in the converted program, and what it costs.

    python examples/benchmark.py                       # stock DistilBERT, full size
    python examples/benchmark.py --models distilbert,bert,vit --attn eager

For each model it prints, side by side, the op histogram of the stock conversion (the captured graph
handed to the converter with no anefx pass) and of anefx's, for Core ML (MIL ops) and, when the
``anefx[coreai]`` extra is installed, for Core AI, with conversion times; then anefx's own time (passes +
validation) against the time of ``ct.convert`` on the rewritten graph, the largest numeric error and
the process's peak memory. Target: anefx's own work ≤ 0.5x ``ct.convert``'s time.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anefx
from examples import models

FULL_SIZE = {
    "distilbert": lambda attn: models.distilbert(attn=attn),
    "bert": lambda attn: models.bert(layers=12, dim=768, heads=12, seq=128, attn=attn),
    "vit": lambda attn: models.vit(layers=12, dim=768, heads=12, image=224, patch=16, attn=attn),
}
KEY_OPS = ("linear", "matmul", "conv", "einsum", "transpose", "reshape", "softmax")


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def bench(name: str, attn: str, coreai: bool) -> dict:
    model, args, kwargs = FULL_SIZE[name](attn)
    stock = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty())
    t0 = time.perf_counter()
    compiled = anefx.compile(model, args, kwargs)
    total = time.perf_counter() - t0
    extra = {}
    if coreai:
        for label, pipeline in (("stock_ai", anefx.Pipeline.empty()), ("anefx_ai", None)):
            c = anefx.compile(model, args, kwargs, pipeline=pipeline, target="coreai")
            extra[label] = c.op_histogram()
            extra[f"{label}_convert"] = c.timings["convert"]
    return extra | {
        "name": f"{name} ({attn})",
        "stock": stock.op_histogram(),
        "anefx": compiled.op_histogram(),
        "passes": compiled.timings["passes"],
        "capture": compiled.timings["capture"],
        "convert": compiled.timings["convert"],
        "stock_convert": stock.timings["convert"],
        "total": total,
        "error": compiled.max_error(),
        "rolled_back": [r.name for r in compiled.report.rolled_back],
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
        f"anefx passes+validation {r['passes']:.2f}s vs ct.convert {r['convert']:.2f}s "
        f"(stock ct.convert {r['stock_convert']:.2f}s): ratio {ratio:.2f} [target <= 0.5: {verdict}]"
    )
    print(f"capture {r['capture']:.2f}s, whole compile {r['total']:.2f}s, max abs error {r['error']:.2e}")
    if r["rolled_back"]:
        print(f"rolled back: {', '.join(r['rolled_back'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="distilbert", help=f"comma-separated, from {sorted(FULL_SIZE)}")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-coreai", action="store_true", help="skip the Core AI conversions")
    args = ap.parse_args(argv)
    from anefx.targets import coreai

    use_coreai = not args.no_coreai and coreai.available()[0]
    if not args.no_coreai and not use_coreai:
        print(f"(Core AI columns skipped: {coreai.available()[1]})")
    for name in args.models.split(","):
        print_result(bench(name.strip(), args.attn, use_coreai))
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
