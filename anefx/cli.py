"""The ``anefx`` command line.

    anefx compile examples/models.py:distilbert -o distilbert.mlpackage
    anefx compile my_pkg.models:build --input x:1x128x768:float32 -o model.mlpackage
    anefx passes
    anefx bisect examples/models.py:mlp_block --pipeline my_pipelines.py:broken
    anefx compile-lm examples/models.py:smollm2 -o smollm2.mlpackage --context-length 256
    anefx generate examples/models.py:smollm2 --prompt "What is the capital of France?" --chat
    anefx run distilbert.mlpackage --random            # run a saved package (any ML Program) or .aimodel
    anefx check distilbert.mlpackage --against examples/models.py:distilbert   # the package against the model

A factory is ``<python file or module>:<function>``. It returns a model, or ``(model, args, kwargs)``;
``--input name:shape:dtype`` builds example inputs (random, seeded) and overrides those it returned.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from anefx.targets.registry import NAMES as TARGETS

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def load_object(spec: str):
    """``path/to/file.py:name`` or ``package.module:name`` → the object."""
    if ":" not in spec:
        raise SystemExit(f"anefx: expected <python-file-or-module>:<name>, got {spec!r}")
    where, name = spec.rsplit(":", 1)
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.exists():
            raise SystemExit(f"anefx: no such file: {where}")
        sys.path.insert(0, str(path.resolve().parent))
        module_spec = importlib.util.spec_from_file_location(f"anefx_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise SystemExit(f"anefx: {where} has no attribute {name!r}") from None


def parse_input(text: str) -> tuple[str, torch.Tensor]:
    """``name:1x128:int64`` → (name, a seeded random tensor); integer inputs are in [0, 100)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"anefx: --input wants name:shape[:dtype], got {text!r}")
    name, shape_text = parts[0], parts[1]
    dtype_name = parts[2] if len(parts) == 3 else "float32"
    if dtype_name not in _DTYPES:
        raise SystemExit(f"anefx: unknown dtype {dtype_name!r}; choose from {sorted(_DTYPES)}")
    try:
        shape = [int(s) for s in shape_text.lower().split("x")]
    except ValueError:
        raise SystemExit(f"anefx: bad shape {shape_text!r} in {text!r} (write e.g. 1x128x768)") from None
    gen = torch.Generator().manual_seed(0)
    dtype = _DTYPES[dtype_name]
    if dtype.is_floating_point:
        return name, torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return name, torch.ones(shape, dtype=torch.bool)
    return name, torch.randint(0, 100, shape, generator=gen, dtype=dtype)


def load_model(spec: str, inputs: list[str]):
    made = load_object(spec)()
    if isinstance(made, tuple):
        model, args, kwargs = [*made, (), {}][:3]
    else:
        model, args, kwargs = made, (), {}
    if inputs:
        args, kwargs = _bind_inputs(model, [parse_input(t) for t in inputs])
    if not args and not kwargs:
        raise SystemExit("anefx: the factory returned no example inputs; pass --input name:shape:dtype")
    return model, tuple(args), dict(kwargs)


def _bind_inputs(model, named: list[tuple[str, torch.Tensor]]) -> tuple[tuple, dict]:
    """Inputs named like ``forward``'s parameters go by keyword; the others by position, in order."""
    import inspect

    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    args = tuple(t for name, t in named if name not in params)
    kwargs = {name: t for name, t in named if name in params}
    return args, kwargs


def _console():
    import os

    from rich.console import Console

    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(stderr=False, width=width)


class StageProgress:
    """Renders a compile's events with ``rich``: a bar over the pass steps (every function's), the
    stage running now, and one line per finished top-level stage with its seconds."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.bar.add_task("start", total=0)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, event) -> None:
        if event.kind == "start":
            if "passes" in event.details:  # the pipeline's passes, once per function
                self.bar.update(self.task, total=(self.bar.tasks[0].total or 0) + event.details["passes"])
            self.bar.update(self.task, description=event.name)
        elif event.kind == "step":
            passes = event.path[0] == "passes" and "of" in event.details
            self.bar.update(self.task, description=event.name, advance=1 if passes else 0)
        elif len(event.path) == 1:
            detail = ", ".join(f"{k}={v}" for k, v in event.details.items() if k not in ("passes", "function"))
            self.bar.console.print(f"{event.name} {event.seconds:.2f}s" + (f" ({detail})" if detail else ""))


def add_compile_options(parser, *, lm: bool = False) -> None:
    """The flags every compiling command shares (``compile``, ``compile-lm``, ``generate``): the same
    flags for the same things, the fields of :class:`~anefx.core.options.CompileOptions`."""
    p = parser.add_argument_group("pipeline")
    p.add_argument("--pipeline", help="<file-or-module>:<function> returning an anefx.Pipeline")
    p.add_argument("--without", action="append", default=[], metavar="PASS", help="drop a pass (repeatable)")
    v = parser.add_argument_group("validation and guard")
    v.add_argument("--validate", choices=["off", "lint", "example", "numeric"], default=None)
    v.add_argument(
        "--allow-worse",
        action="store_true",
        help="ship the passes' output even where a region has more layout changes than stock (no guard)",
    )
    d = parser.add_argument_group("debugging")
    d.add_argument("--dump-dir", default=None, help="write per-pass graphs, diffs and pictures here")
    d.add_argument("--print-ir-after-all", action="store_true", default=None, help="print the graph after every pass")
    d.add_argument("--print-ir-after", default=None, metavar="PASSES", help="print the graph after these passes (a,b)")
    d.add_argument("--print-ir-before", default=None, metavar="PASSES", help="print the graph before these passes")
    d.add_argument(
        "--print-ir-after-change", action="store_true", default=None, help="print only after passes that changed it"
    )
    d.add_argument("--bisect-limit", type=int, default=None, metavar="N", help="run only the first N pass applications")
    t = parser.add_argument_group("target and deployment")
    t.add_argument("--target", default="coreml", choices=list(TARGETS))
    t.add_argument(
        "--compression",
        default=None,
        metavar="SCHEME",
        help="compress the weights"
        + (" of every function" if lm else "")
        + ": lut4, lut6, lut8 (grouped-channel LUTs, iOS18) or int8 (per channel)",
    )
    t.add_argument(
        "--max-chunk-mb", type=float, default=None, help="split into packages of at most this many MB (+ manifest)"
    )
    t.add_argument(
        "--lm-head-max-channels",
        type=int,
        default=None,
        metavar="N",
        help="split the projection to the vocabulary into convs of at most N output channels",
    )


def compile_options(ns):
    """The :class:`~anefx.core.options.CompileOptions` of the shared flags."""
    import anefx
    from anefx.driver.debug import DebugOptions
    from anefx.targets.lm_head import LMHeadOptions

    pipeline = load_object(ns.pipeline)() if getattr(ns, "pipeline", None) else anefx.Pipeline.default()
    if getattr(ns, "without", None):
        pipeline = pipeline.without(*ns.without)
    switches = {
        "dump_dir": ns.dump_dir,
        "print_ir_after_all": ns.print_ir_after_all,
        "print_ir_after": ns.print_ir_after,
        "print_ir_before": ns.print_ir_before,
        "print_ir_after_change": ns.print_ir_after_change,
        "bisect_limit": ns.bisect_limit,
    }
    given = {k: v for k, v in switches.items() if v is not None}
    debug = DebugOptions.from_env().merged(**given) if given else None
    head = LMHeadOptions(max_channels=ns.lm_head_max_channels) if ns.lm_head_max_channels else None
    return anefx.CompileOptions(
        pipeline=pipeline,
        validate=ns.validate,
        debug=debug,
        never_worse=not ns.allow_worse,
        target=ns.target,
        compression=ns.compression,
        max_chunk_mb=ns.max_chunk_mb,
        lm_head=head,
    )


def cmd_compile(ns) -> int:
    import anefx

    model, args, kwargs = load_model(ns.factory, ns.input)
    options = compile_options(ns)
    out = Path(ns.output)
    console = _console()
    with StageProgress(console) as progress:
        compiled = anefx.compile(model, args, kwargs, options=options, progress=progress)
    console.print(compiled.report.rich_table())
    for line in compiled.report.guard_lines():
        console.print(line)
    if compiled.compression is not None:
        console.print(compiled.compression.quality.rich_table())
        console.print(
            "compression: " + ", ".join(f"{k}={v}" for k, v in compiled.compression.quality.summary().items())
        )
    ops = compiled.op_histogram()
    console.print("ops: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
    console.print(f"max abs error vs the model: {compiled.max_error():.2e}")
    compiled.save(out)
    console.print(f"wrote {out}")
    return 0


def load_lm(spec: str):
    """A causal-LM factory returns a model, or ``(model, tokenizer)``."""
    made = load_object(spec)()
    if isinstance(made, tuple):
        return made[0], (made[1] if len(made) > 1 else None)
    return made, None


def quality_prompts(ns, tok):
    """The fixed prompt set of the compression measurement: ``--quality-prompt`` texts (or anefx's 4
    default ones) through the tokenizer's chat template; without a tokenizer, compile_lm's default."""
    from anefx.lm.generate import DEFAULT_TEXT_PROMPTS

    if tok is None:
        return None
    texts = getattr(ns, "quality_prompt", None) or list(DEFAULT_TEXT_PROMPTS)
    out = []
    for text in texts:
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        out.append(tok(text, return_tensors="pt")["input_ids"])
    return out


def _compile_lm(ns, console, model, *, convert: bool, check_prompt=None, tok=None):
    import anefx

    options = compile_options(ns)
    with StageProgress(console) as progress:
        lm = anefx.compile_lm(
            model,
            options=options,
            context_length=ns.context_length,
            prefill_length=ns.prefill_length,
            convert=convert,
            check_prompt=check_prompt,
            check_tokens=ns.check_tokens,
            progress=progress,
            quality_prompts=quality_prompts(ns, tok) if ns.compression else None,
            quality_tokens=getattr(ns, "quality_tokens", 64),
        )
    return lm


def lm_table(lm):
    """Both functions' MIL op histograms side by side, and the states."""
    from rich.table import Table

    table = Table(title=f"prefill ({lm.prefill_length} tokens) and decode (1 token): MIL ops")
    table.add_column("op")
    for fn in lm.functions:
        table.add_column(fn, justify="right")
    hists = {fn: lm.op_histogram(fn) for fn in lm.functions}
    for op in sorted(set().union(*hists.values()), key=lambda o: (-hists["decode"][o], o)):
        table.add_row(op, *(str(hists[fn][op]) for fn in lm.functions))
    states = Table(title=f"KV cache as Core ML states (fp16, context {lm.context_length})")
    states.add_column("state")
    states.add_column("shape")
    states.add_column("bytes", justify="right")
    for name, shape in lm.states.items():
        states.add_row(name, "x".join(map(str, shape)), f"{2 * torch.Size(shape).numel():,}")
    states.add_row("total", "", f"{lm.layout.state_bytes():,}")
    return table, states


def chunk_table(lm):
    from rich.table import Table

    table = Table(title=f"{len(lm.chunks.chunks)} chunks of at most {lm.chunks.cap_mb:g} MB (weights)")
    for col in ("chunk", "layers", "states", "weights MB", "decode inputs"):
        table.add_column(col)
    for c in lm.chunks.chunks:
        size = c.package.weight_bytes() / 1e6
        layers = f"{c.layers[0]}-{c.layers[-1]}" if c.layers else "-"
        table.add_row(str(c.index), layers, str(len(c.states)), f"{size:.1f}", ", ".join(c.value_inputs("decode")))
    return table


def cmd_compile_lm(ns) -> int:
    console = _console()
    model, tok = load_lm(ns.factory)
    lm = _compile_lm(ns, console, model, convert=True, tok=tok)
    for name, report in lm.reports.items():
        console.print(f"[bold]{name}[/bold]")
        console.print(report.rich_table())
        for line in report.guard_lines():
            console.print(line)
        conversion = {k: v for k, v in report.conversion.items() if k.startswith("converter_input")}
        if conversion:
            console.print(f"{name} converter input: " + ", ".join(f"{k}={v}" for k, v in conversion.items()))
    for table in lm_table(lm):
        console.print(table)
    if lm.check is not None:
        console.print(str(lm.check))
    if lm.compression is not None:
        console.print(str(lm.compression), end="")
        if lm.compression.lm is not None:
            q = lm.compression.lm
            console.print(
                f"{lm.compression.options.scheme}: weights x{lm.compression.size_ratio:.3f} of fp16; greedy-token "
                f"agreement {q.agreement:.3f}, mean KL {q.mean_kl:.4g} over {q.prompts} prompts x "
                f"{q.tokens // max(q.prompts, 1)} new tokens (against the fp16 weights, on the shipped weights)"
            )
    if lm.chunks is not None:
        console.print(chunk_table(lm))
    path = lm.save(ns.output)
    console.print(f"wrote {path}")
    return 0


def cmd_generate(ns) -> int:
    console = _console()
    model, tok = load_lm(ns.factory)
    if ns.prompt_ids:
        ids = torch.tensor([[int(t) for t in ns.prompt_ids.split(",")]])
    elif ns.prompt is not None:
        if tok is None:
            raise SystemExit("anefx: this factory returns no tokenizer: pass --prompt-ids 1,2,3")
        if ns.chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": ns.prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = ns.prompt
        ids = tok(text, return_tensors="pt")["input_ids"]
    else:
        raise SystemExit("anefx: pass --prompt TEXT (with a tokenizer) or --prompt-ids 1,2,3")
    lm = _compile_lm(ns, console, model, convert=not ns.no_convert, check_prompt=ids)
    if lm.check is not None:
        console.print(str(lm.check))
    pieces = []

    def show(token: int) -> None:
        pieces.append(token)
        console.print(tok.decode([token]) if tok is not None else f"{token} ", end="")

    out = lm.generate(ids, ns.max_new_tokens, runtime=ns.runtime, on_token=show)
    console.print()
    console.print(f"[{len(out.new_tokens)} tokens, stopped: {out.stop_reason}] {out.message}")
    if ns.output and lm.package is not None:
        lm.save(ns.output)
        console.print(f"wrote {ns.output}")
    return 0


def cmd_passes(ns) -> int:
    from rich.table import Table

    from anefx.passes import ALL_PASSES, DEFAULT_PASSES

    table = Table(title="anefx passes (default pipeline order)")
    table.add_column("#", justify="right")
    table.add_column("pass")
    table.add_column("default")
    table.add_column("what it does")
    for i, cls in enumerate(ALL_PASSES, 1):
        table.add_row(str(i), cls.name, "yes" if cls in DEFAULT_PASSES else "no", cls.summary())
    _console().print(table)
    if ns.name:
        cls = next((c for c in ALL_PASSES if c.name == ns.name), None)
        if cls is None:
            raise SystemExit(f"anefx: no pass named {ns.name!r}")
        print(cls.__doc__)
    return 0


def cmd_bisect(ns) -> int:
    import anefx
    from anefx.driver.bisect import bisect

    model, args, kwargs = load_model(ns.factory, ns.input)
    pipeline = load_object(ns.pipeline)() if ns.pipeline else anefx.Pipeline.default()
    result = bisect(model, args, kwargs, pipeline=pipeline)
    print(result)
    return 1 if result.culprit is not None else 0


def cmd_check(ns) -> int:
    import anefx
    from anefx.ane.report import compare_estimates

    if ns.against:
        return _check_artifact(ns)
    model, args, kwargs = load_model(ns.factory, ns.input)
    compiled = anefx.compile(model, args, kwargs)
    report = compiled.ane_report
    console = _console()
    for table in report.rich_tables():
        console.print(table)
    console.print(f"real per-op devices: {report.compute_plan}")
    if ns.compare_stock:
        stock = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty()).ane_report
        console.print(compare_estimates({"stock": stock, "anefx": report}))
    if ns.json:
        Path(ns.json).write_text(report.to_json())
        console.print(f"wrote {ns.json}")
    return 0


def _check_artifact(ns) -> int:
    """``anefx check PATH --against file.py:factory``: the saved program run against the model."""
    import json

    from rich.table import Table

    import anefx

    model, args, kwargs = load_model(ns.against, ns.input)
    result = anefx.check_artifact(ns.factory, model, args, kwargs, function=ns.function, runtime=ns.runtime)
    console = _console()
    table = Table(
        title=f"{ns.factory}: {result.function!r} ({result.runtime}, {result.precision}) against {ns.against}; "
        f"input sets: {', '.join(result.input_sets)}"
    )
    for col in ("output", "max abs error", "of its scale", "scale", "inf/nan", "worst input set", ""):
        table.add_column(col, justify="left" if col in ("output", "worst input set", "") else "right")
    for o in result.outputs.values():
        verdict = "[green]ok[/green]" if o.ok else "[red]FAIL[/red]"
        table.add_row(
            o.name,
            f"{o.max_abs_error:.3g}",
            f"{o.rel_error:.3g}",
            f"{o.scale:.3g}",
            str(o.nonfinite),
            o.input_set,
            verdict,
        )
    console.print(table)
    if result.not_compared:
        console.print(f"not compared (no output of the model matches): {', '.join(result.not_compared)}")
    console.print(result.message(), markup=False)
    if ns.json:
        Path(ns.json).write_text(json.dumps(result.summary(), indent=2))
        console.print(f"wrote {ns.json}")
    return 0 if result.ok else 1


def _run_inputs(ns, program, function: str) -> tuple[dict, dict]:
    """The inputs of ``anefx run``: ``--input name=file.npy`` and, with ``--random``, seeded random
    values for the others (floats ~ N(0, 1), integers in [0, 100), booleans True)."""
    import numpy as np

    from anefx.ir.errors import AnefxError

    specs = program.inputs(function)
    given, source = {}, {}
    for text in ns.input:
        name, sep, file = text.partition("=")
        if not sep or not file:
            raise SystemExit(f"anefx: --input wants name=file.npy, got {text!r}")
        if name not in specs:
            raise SystemExit(f"anefx: {function!r} has no input {name!r}; its inputs: {list(specs)}")
        try:
            given[name] = np.load(file)
        except OSError as exc:
            raise SystemExit(f"anefx: cannot read {file}: {exc}") from None
        source[name] = file
    missing = [n for n in specs if n not in given]
    if missing and not ns.random:
        wanted = ", ".join(f"{n} ({specs[n]})" for n in missing)
        raise AnefxError(f"no value for {wanted}: pass --input name=file.npy, or --random")
    rng = np.random.default_rng(0)
    for name in missing:
        spec = specs[name]
        shape = tuple(1 if d is None else d for d in spec.shape)
        if np.issubdtype(spec.dtype, np.floating):
            given[name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            given[name] = np.ones(shape, np.bool_)
        else:
            given[name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        source[name] = "random"
    return given, source


def cmd_run(ns) -> int:
    import time

    from rich.table import Table

    import anefx

    console = _console()
    t0 = time.perf_counter()
    program = anefx.load(ns.path, runtime=ns.runtime)
    load_seconds = time.perf_counter() - t0
    function = program.function_name(ns.function)
    inputs, source = _run_inputs(ns, program, function)
    state = program.make_state(function) if program.states(function) else None
    t0 = time.perf_counter()
    outputs = program(inputs, function=function, state=state)
    run_seconds = time.perf_counter() - t0
    table = Table(
        title=f"{ns.path}: {function!r} ({program.runtime} runtime; functions {', '.join(program.functions)})"
    )
    for col in ("", "name", "shape", "dtype", "min", "max", "mean", "std", "inf/nan"):
        table.add_column(col, justify="right" if col in ("min", "max", "mean", "std", "inf/nan") else "left")
    for i, (name, value) in enumerate(inputs.items()):
        row = ("input", f"{name} ({source[name]})", _shape_text(value), str(value.dtype), *_summary(value), "")
        table.add_row(*row, end_section=i == len(inputs) - 1)
    for name, value in outputs.items():
        table.add_row("output", name, _shape_text(value), str(value.dtype), *_summary(value), _bad(value))
    console.print(table)
    if state is not None:
        console.print(f"states (fresh, zeros): {', '.join(f'{k} {v}' for k, v in program.states(function).items())}")
    console.print(f"load {load_seconds:.3f} s, run {run_seconds:.3f} s")
    if hasattr(program, "close"):
        program.close()
    return 0


def _shape_text(value) -> str:
    return "x".join(map(str, value.shape)) or "scalar"


def _summary(value) -> list[str]:
    import numpy as np

    if value.size == 0:
        return ["", "", "", ""]
    v = value.astype(np.float64)
    finite = v[np.isfinite(v)] if np.issubdtype(value.dtype, np.floating) else v
    if finite.size == 0:
        return ["-", "-", "-", "-"]
    return [f"{finite.min():.4g}", f"{finite.max():.4g}", f"{finite.mean():.4g}", f"{finite.std():.4g}"]


def _bad(value) -> str:
    import numpy as np

    if not np.issubdtype(value.dtype, np.floating):
        return ""
    inf, nan = int(np.isinf(value).sum()), int(np.isnan(value).sum())
    return f"[red]{inf}/{nan}[/red]" if inf or nan else "0/0"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anefx", description="Compile PyTorch models for the Apple Neural Engine.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model to .mlpackage (Core ML) or .aimodel (Core AI)")
    c.add_argument("factory", help="<python-file-or-module>:<function> returning a model or (model, args, kwargs)")
    c.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE", help="e.g. x:1x128x768:float32")
    c.add_argument("-o", "--output", required=True, help="output path (.mlpackage or .aimodel)")
    add_compile_options(c)
    c.set_defaults(func=cmd_compile)

    p = sub.add_parser("passes", help="list the passes (the catalog)")
    p.add_argument("name", nargs="?", help="show one pass's documentation")
    p.set_defaults(func=cmd_passes)

    b = sub.add_parser("bisect", help="find the first pass that makes the model wrong")
    b.add_argument("factory")
    b.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE")
    b.add_argument("--pipeline", help="<file-or-module>:<function> returning an anefx.Pipeline")
    b.set_defaults(func=cmd_bisect)
    k = sub.add_parser(
        "check",
        help="ANE readiness report (which ops leave the ANE, why, from which line); "
        "or, with --against, run a saved package and compare it with the PyTorch model",
    )
    k.add_argument("factory", help="<python-file-or-module>:<function>; with --against: a saved package")
    k.add_argument(
        "--against",
        metavar="FACTORY",
        help="compare the saved package FACTORY names with this model (example, random and stress inputs)",
    )
    k.add_argument("--function", default=None, help="with --against: the function to run")
    k.add_argument("--runtime", choices=["auto", "mil", "coreml", "coreai"], default="auto")
    k.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE")
    k.add_argument("--json", help="also write the report as JSON here")
    k.add_argument("--compare-stock", action="store_true", help="estimate of the stock conversion side by side")
    k.set_defaults(func=cmd_check)

    def lm_options(sp):
        sp.add_argument(
            "factory", help="<python-file-or-module>:<function> returning a causal LM or (model, tokenizer)"
        )
        lm = sp.add_argument_group("language model")
        lm.add_argument("--context-length", type=int, default=512, help="tokens the KV cache holds")
        lm.add_argument("--prefill-length", type=int, default=64, help="tokens per prefill call")
        lm.add_argument("--check-tokens", type=int, default=16, help="new tokens compared with the model's generate")
        add_compile_options(sp, lm=True)

    cl = sub.add_parser("compile-lm", help="compile a causal LM: prefill + decode, KV cache as state, one .mlpackage")
    lm_options(cl)
    cl.add_argument("-o", "--output", required=True, help="output .mlpackage (a folder when chunked)")
    cl.add_argument("--quality-tokens", type=int, default=64, help="new tokens per prompt of the compression quality")
    cl.add_argument(
        "--quality-prompt", action="append", default=[], metavar="TEXT", help="a prompt of the quality set (repeatable)"
    )
    cl.set_defaults(func=cmd_compile_lm)
    g = sub.add_parser("generate", help="compile a causal LM and generate greedily with the compiled graphs")
    lm_options(g)
    g.add_argument("--prompt", help="prompt text (needs a tokenizer from the factory)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    g.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument(
        "--runtime",
        choices=["torch", "target", "mil", "coreml"],
        default="torch",
        help="torch: the rewritten graphs; target: the package with the target's executor (anefx's MIL "
        "interpreter); mil or coreml (macOS) name it",
    )
    g.add_argument("--no-convert", action="store_true", help="skip the conversion (torch runtime only)")
    g.add_argument("-o", "--output", help="also save the .mlpackage here")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser(
        "run", help="run a saved .mlpackage (any ML Program), .aimodel or chunk folder and summarize its outputs"
    )
    r.add_argument("path", help="a saved .mlpackage, .aimodel or chunk folder (manifest.json)")
    r.add_argument("--function", default=None, help="the function to run (default: the program's default)")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a .npy file")
    r.add_argument("--random", action="store_true", help="seeded random values for the inputs not given")
    r.add_argument(
        "--runtime",
        choices=["auto", "mil", "coreml", "coreai"],
        default="auto",
        help="auto: anefx's MIL interpreter for .mlpackage, coreai-core for .aimodel; coreml needs macOS",
    )
    r.set_defaults(func=cmd_run)
    return ap


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except Exception as exc:
        from anefx.ir.errors import AnefxError

        if isinstance(exc, AnefxError):
            print(f"anefx: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
