"""Writes ``passes_catalog/``: one page per pass from its docstring, options and a tested example.

    python -m anefx.catalog            # regenerate (from a source checkout)
    python -m anefx.catalog --check    # exit 1 when a page is out of date

The before/after graphs on each page are produced here, by running the pass on the example model
named in :data:`EXAMPLES` (from ``examples/models.py``); ``tests/test_catalog.py`` fails when a page
differs from what this module generates, so the catalog can never drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from anefx.driver.pipeline import Pipeline
from anefx.ir.capture import capture
from anefx.ir.graph import format_graph
from anefx.passes import ALL_PASSES, DEFAULT_PASSES, Pass

ROOT = Path(__file__).resolve().parents[1]
CATALOG_DIR = ROOT / "passes_catalog"


@dataclass(frozen=True)
class CatalogExample:
    factory: str  #: a function in examples/models.py returning (model, args, kwargs)
    prepare: tuple[str, ...] = ()  #: passes run before the documented one


EXAMPLES: dict[str, CatalogExample] = {
    "canonicalize": CatalogExample("masked_scores"),
    "token_batch_norm": CatalogExample("tiny_token_batch_norm"),
    "fold_constants": CatalogExample("masked_scores", ("canonicalize",)),
    "grouped_projection": CatalogExample("tiny_grouped"),
    "linear_to_conv": CatalogExample("tiny_block"),
    "conv1d_bc1s": CatalogExample("conv_stem"),
    "layer_norm_bc1s": CatalogExample("tiny_block"),
    "rms_norm_bc1s": CatalogExample("tiny_rms_norm", ("canonicalize",)),
    "split_modulation": CatalogExample("tiny_modulation", ("canonicalize",)),
    "group_norm_4d": CatalogExample("tiny_group_norm"),
    "cache_write_bc1s": CatalogExample("tiny_cache_write", ("linear_to_conv",)),
    "attention_bc1s": CatalogExample("tiny_attention", ("linear_to_conv",)),
    "attention_chunks": CatalogExample("long_attention", ("linear_to_conv", "attention_bc1s")),
    "fp16_mask_values": CatalogExample("masked_scores_fp32min"),
    "to_bc1s": CatalogExample("tiny_block", ("linear_to_conv", "layer_norm_bc1s")),
    "fold_transposes": CatalogExample("transpose_pairs"),
    "fp16_norm_scale": CatalogExample("large_rms_norm", ("canonicalize", "rms_norm_bc1s")),
    "fp16_residual_scale": CatalogExample("large_residual", ("canonicalize",)),
}


def load_examples_module():
    path = ROOT / "examples" / "models.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the catalog is generated from a source checkout of anefx")
    spec = importlib.util.spec_from_file_location("anefx_example_models", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@dataclass
class ExampleRun:
    before: str
    after: str
    record: object


def run_example(pass_cls: type[Pass]) -> ExampleRun:
    """Run ``pass_cls`` on its catalog example; return the graph before and after, and the record."""
    example = EXAMPLES[pass_cls.name]
    model, args, kwargs = getattr(load_examples_module(), example.factory)()
    captured = capture(model, args, kwargs)
    prepared = Pipeline.from_names(example.prepare).run(
        captured.graph_module, captured.flat_inputs, reference_outputs=captured.reference_outputs
    )
    result = Pipeline((pass_cls(),)).run(
        prepared.graph_module, captured.flat_inputs, reference_outputs=captured.reference_outputs
    )
    return ExampleRun(format_graph(prepared.graph_module), format_graph(result.graph_module), result.records[0])


#: Bounds a page may state for a pass's error: each far from the float noise of the examples, so
#: the page is the same on every CPU.
ERROR_BOUNDS = (1e-5, 1e-3)


def _bound(rel: float | None) -> str:
    for bound in ERROR_BOUNDS:
        if rel is not None and rel < bound:
            return f"< {bound:g}"
    return f">= {ERROR_BOUNDS[-1]:g}"


def _options_table(pass_cls: type[Pass]) -> str:
    fields = dataclasses.fields(pass_cls.Options)
    if not fields:
        return "This pass has no options.\n"
    rows = ["| option | type | default |", "| --- | --- | --- |"]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        rows.append(f"| `{f.name}` | `{f.type}` | `{default!r}` |")
    return "\n".join(rows) + "\n"


def render_page(pass_cls: type[Pass]) -> str:
    doc = (pass_cls.__doc__ or "").strip()
    title, _, body = doc.partition("\n")
    example = EXAMPLES[pass_cls.name]
    run = run_example(pass_cls)
    rec = run.record
    # no position (a pass added upstream would shift it) and no measured error (floating-point
    # noise differs between CPUs): the index lists the order, the page states a bound
    default = "yes (the [index](index.md) lists the order)" if pass_cls in DEFAULT_PASSES else "no"
    stats = ", ".join(f"{k}={v}" for k, v in rec.stats.items()) or "none"
    err = "n/a (graph unchanged)" if rec.max_abs_error is None else _bound(rec.max_rel_error)
    prepare = ", ".join(f"`{p}`" for p in example.prepare) or "none"
    return f"""# {title.strip()}

<!-- generated by `python -m anefx.catalog` from the pass's docstring and example: do not edit -->

- Class: `{pass_cls.__module__}.{pass_cls.__qualname__}`
- In the default pipeline: {default}
- Runs after (when present): {", ".join(f"`{n}`" for n in sorted(pass_cls.runs_after)) or "any pass"}

## Description

{body.strip()}

## Options

{_options_table(pass_cls)}
## Example

Model `examples/models.py:{example.factory}`, captured with `anefx.ir.capture`; passes run before: {prepare}.
The pass reported: {stats}; status: {rec.status}; error against the original model (relative to the
output's scale): {err}.

### Before

```text
{run.before.rstrip()}
```

### After

```text
{run.after.rstrip()}
```
"""


def render_index() -> str:
    rows = ["| # | pass | default | what it does |", "| --- | --- | --- | --- |"]
    for i, cls in enumerate(ALL_PASSES, 1):
        default = "yes" if cls in DEFAULT_PASSES else "no"
        rows.append(f"| {i} | [`{cls.name}`]({cls.name}.md) | {default} | {cls.summary()} |")
    return (
        "# anefx passes catalog\n\n"
        "<!-- generated by `python -m anefx.catalog`: do not edit -->\n\n"
        "The default pipeline runs the passes in this order; each page shows the pass's real effect on a "
        "tested example model. `anefx passes` prints the same list.\n\n" + "\n".join(rows) + "\n" + SITES_SECTION
    )


SITES_SECTION = """
## Rewrite sites: rollback per site

After every pass the graph is validated against the model (the example inputs, seeded random
inputs and, when the model has a mask-like input, stress masks: right and left padding, one key
kept per row). A pass that rewrites independent places declares each one as a *site*: it calls
`ctx.site(anchor)` once per candidate place, with the node the rewrite replaces, and leaves the
place alone when that returns `False`:

```python
for node in list(gm.graph.nodes):
    if node.target != aten.layer_norm.default or not ctx.site(node):
        continue
    ...  # rewrite this LayerNorm
```

When such a pass fails validation, the pipeline re-runs it on halves of its sites until it has
found the failing ones (about 2·log2(n) re-runs for one bad site of n), keeps the pass without
them, and the report names each excluded site: its node, op, the user's source line and the error.
`canonicalize`, `token_batch_norm`, `fold_constants`, `split_modulation`, `grouped_projection`,
`linear_to_conv`, `conv1d_bc1s`, `layer_norm_bc1s`, `rms_norm_bc1s`, `group_norm_4d`,
`cache_write_bc1s`, `attention_bc1s` and `fp16_mask_values` declare sites. `to_bc1s` and
`fold_transposes` stay whole: they choose one layout for the whole graph (a cut over the dataflow
graph) and cancel transposes in chains, so a part of their rewrite is not a rewrite of its own and
may not even be consistent.
The Core ML and Core AI hand-offs legalize the same way, site by site, and validate the graph they
hand to the converter.
"""


def render_all() -> dict[str, str]:
    pages = {"index.md": render_index()}
    for cls in ALL_PASSES:
        pages[f"{cls.name}.md"] = render_page(cls)
    return pages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate passes_catalog/")
    ap.add_argument("--check", action="store_true", help="fail when a page is out of date")
    ap.add_argument("--dir", type=Path, default=CATALOG_DIR)
    args = ap.parse_args(argv)
    pages = render_all()
    stale = []
    for name, text in pages.items():
        path = args.dir / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            args.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date: " + ", ".join(stale) + " (run python -m anefx.catalog)", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(pages)} pages in {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
