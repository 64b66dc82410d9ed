"""Pass-by-pass debugging: print-IR, dump dir, bisect limit, reproducers, anefx bisect."""

import json
import shutil

import pytest
import torch
from test_pipeline import FlipSign

import anefx
from anefx.driver.bisect import bisect
from anefx.driver.debug import DebugOptions
from helpers import example


def test_print_ir_switches(capsys, monkeypatch):
    model, args, _ = example("mlp")
    anefx.compile(model, args, convert=False, print_ir_after="linear_to_conv", print_ir_before="to_bc1s")
    err = capsys.readouterr().err
    index = anefx.Pipeline.default().names.index("linear_to_conv")
    assert f"IR Dump After linear_to_conv ({index})" in err and "aten.conv2d" in err
    assert "IR Dump Before to_bc1s" in err and "IR Dump After to_bc1s" not in err
    monkeypatch.setenv("ANEFX_PRINT_IR_AFTER_CHANGE", "1")
    anefx.compile(model, args, convert=False)
    err = capsys.readouterr().err
    assert "IR Dump After linear_to_conv" in err and "IR Dump After canonicalize" not in err


def test_env_vars_are_read():
    d = DebugOptions.from_env(
        {
            "ANEFX_PRINT_IR_AFTER_ALL": "1",
            "ANEFX_PRINT_IR_AFTER": "a, b",
            "ANEFX_BISECT_LIMIT": "-1",
            "ANEFX_DUMP_DIR": "x",
        }
    )
    assert d.print_ir_after_all and d.print_ir_after == {"a", "b"} and d.bisect_limit == -1 and str(d.dump_dir) == "x"


def test_dump_dir_holds_every_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("ANEFX_DUMP_DIR", str(tmp_path))
    model, args, kwargs = example("distilbert_small")
    anefx.compile(model, args, kwargs, convert=False)
    names = {p.name for p in tmp_path.iterdir()}
    for i, name in enumerate(anefx.Pipeline.default().names, 1):
        stem = f"{i:02d}_{name}"
        assert {f"{stem}.before.txt", f"{stem}.after.txt", f"{stem}.diff", f"{stem}.error.json"} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["pass"] for e in summary] == anefx.Pipeline.default().names
    index = anefx.Pipeline.default().names.index("linear_to_conv")
    assert summary[index]["max_abs_error"] is not None
    diff = (tmp_path / f"{index + 1:02d}_linear_to_conv.diff").read_text()
    assert "-%linear = aten.linear" in diff and "+%conv2d" in diff
    pictures = [p for p in tmp_path.iterdir() if p.suffix in (".svg", ".dot")]
    assert pictures, "no graph picture"
    if shutil.which("dot"):
        position = anefx.Pipeline.default().names.index("to_bc1s") + 1
        svg = tmp_path / f"{position:02d}_to_bc1s.svg"
        assert svg.exists() and "<svg" in svg.read_text()[:500]
        assert "#9ecae1" in svg.read_text()  # (B, C, 1, S) nodes are coloured


def test_bisect_limit_lists_and_limits(capsys):
    model, args, _ = example("mlp_block")
    c = anefx.compile(model, args, convert=False, bisect_limit=-1)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("BISECT:")]
    names = anefx.Pipeline.default().names
    assert lines[0] == f"BISECT: running pass (0) {names[0]}" and len(lines) == len(names)
    assert all(not r.skipped for r in c.report.records)
    c = anefx.compile(model, args, convert=False, bisect_limit=4)
    assert [r.name for r in c.report.records if not r.skipped] == anefx.Pipeline.default().names[:4]
    assert "NOT running pass (4)" in capsys.readouterr().err
    if "layer_norm_bc1s" not in names[:4]:  # not run: the LayerNorm stays as it was
        assert "aten.layer_norm.default" in {str(n.target) for n in c.graph_module.graph.nodes}


def test_reproducer_is_written_and_loads(tmp_path):
    model, args, _ = example("mlp_block")
    pipeline = anefx.Pipeline.default().insert_after("linear_to_conv", FlipSign())
    anefx.compile(model, args, pipeline=pipeline, convert=False, dump_dir=tmp_path)
    repro = tmp_path / f"reproducer_{pipeline.names.index('flip_sign'):02d}_flip_sign"
    assert repro.is_dir()
    gm, inputs, info = anefx.load_reproducer(repro)
    assert info["failed_pass"] == "flip_sign" and "differs" in info["error"]
    names = [p["name"] for p in info["pipeline"]]
    assert names.index("flip_sign") == names.index("linear_to_conv") + 1
    out = gm(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, model(*args), atol=1e-5, rtol=1e-5)  # the graph before the bad pass


def test_bisect_finds_a_planted_broken_pass():
    model, args, _ = example("mlp_block")
    pipeline = anefx.Pipeline.default().insert_after("layer_norm_bc1s", FlipSign())
    result = bisect(model, args, pipeline=pipeline)
    assert result.culprit == "flip_sign" and result.culprit_index == pipeline.names.index("flip_sign")
    clean = bisect(model, args)
    assert clean.culprit is None


@pytest.mark.parametrize("mode", ["off", "lint"])
def test_validate_option(mode):
    model, args, _ = example("mlp")
    c = anefx.compile(model, args, convert=False, validate=mode)
    rec = c.report.record("linear_to_conv")
    assert rec.modified and rec.max_abs_error is None
