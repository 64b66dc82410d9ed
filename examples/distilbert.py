"""The main job: compile a stock, full-size DistilBERT (transformers, seq len 128) for the ANE.

    python examples/distilbert.py --out out/distilbert.mlpackage

Prints what each pass did, checks the rewritten graph against the stock model, writes the
``.mlpackage`` and prints its MIL op histogram next to the plain coremltools conversion's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import distilbert

import anefx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/distilbert.mlpackage")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--compare-stock", action="store_true", help="also convert the stock model (slower)")
    args = ap.parse_args(argv)

    model, ex_args, ex_kwargs = distilbert(n_layers=args.layers, attn=args.attn)
    compiled = anefx.compile(model, ex_args, ex_kwargs)
    print(compiled.report)
    print(f"max |anefx - stock| on the example inputs: {compiled.max_error():.2e}")
    print("timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in compiled.timings.items()))
    anefx_ops = compiled.op_histogram()
    if args.compare_stock:
        stock = anefx.compile(model, ex_args, ex_kwargs, pipeline=anefx.Pipeline.empty())
        stock_ops = stock.op_histogram()
        print(f"{'MIL op':<20}{'stock':>8}{'anefx':>8}")
        for op in sorted(set(stock_ops) | set(anefx_ops)):
            print(f"{op:<20}{stock_ops.get(op, 0):>8}{anefx_ops.get(op, 0):>8}")
    else:
        print("MIL ops: " + ", ".join(f"{k}={v}" for k, v in sorted(anefx_ops.items())))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiled.save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
