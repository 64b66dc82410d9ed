"""The anefx command line, run as users run it."""

import os
import subprocess
import sys
from pathlib import Path

import coremltools as ct

ROOT = Path(__file__).resolve().parents[1]
ANEFX = [sys.executable, "-m", "anefx.cli"]


def run(*args, cwd=ROOT):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([*ANEFX, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_help():
    res = run("--help")
    assert res.returncode == 0 and "compile" in res.stdout and "bisect" in res.stdout


def test_compile_from_a_file(tmp_path):
    out = tmp_path / "mlp.mlpackage"
    res = run("compile", "examples/models.py:block_stack", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "linear_to_conv" in res.stdout and f"wrote {out}" in res.stdout
    assert ct.utils.load_spec(str(out)).WhichOneof("Type") == "mlProgram"
    # the blocks' convs would add a transpose in and one out where stock's linears have none
    assert "never worse than stock" in res.stdout and "kept region 0 in its original form" in res.stdout


def test_compile_with_explicit_inputs(tmp_path):
    factory = tmp_path / "mine.py"
    factory.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(16, 4))\n")
    out = tmp_path / "m.mlpackage"
    res = run("compile", f"{factory}:build", "--input", "x:2x5x16:float32", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.exists()


def test_bad_inputs_are_explained(tmp_path):
    factory = tmp_path / "mine.py"
    factory.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(16, 4)\n")
    res = run("compile", f"{factory}:build", "--input", "x:2x7:float32", "-o", str(tmp_path / "m.mlpackage"))
    assert res.returncode == 2 and "do not fit" in res.stderr
    assert not (tmp_path / "m.mlpackage").exists()
    res = run("compile", f"{factory}:nope", "-o", "x.mlpackage")
    assert res.returncode != 0 and "no attribute 'nope'" in res.stderr


def test_passes_lists_every_pass():
    from anefx.passes import ALL_PASSES

    res = run("passes")
    assert res.returncode == 0
    for cls in ALL_PASSES:
        assert cls.name in res.stdout


def anefx_names():
    import anefx

    return anefx.Pipeline.default().names


def test_bisect_command(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import anefx\n"
        "from test_pipeline import FlipSign\n\n"
        "def pipeline():\n"
        "    return anefx.Pipeline.default().insert_after('to_bc1s', FlipSign())\n"
    )
    res = run("bisect", "examples/models.py:mlp_block", "--pipeline", f"{broken}:pipeline")
    index = anefx_names().index("to_bc1s") + 1
    assert res.returncode == 1 and f"first bad pass application: ({index}) flip_sign" in res.stdout


def _flags(command: str) -> set[str]:
    import re

    res = run(command, "--help")
    assert res.returncode == 0, res.stderr
    return set(re.findall(r"(--[a-z][a-z-]+)", res.stdout))


def test_compile_and_compile_lm_take_the_same_compile_flags():
    """One set of flags for the same things (CompileOptions): pipeline, validation, guard, debug, target."""
    shared = {"--pipeline", "--without", "--validate", "--allow-worse", "--dump-dir", "--print-ir-after-all"}
    shared |= {"--print-ir-after", "--print-ir-before", "--print-ir-after-change", "--bisect-limit", "--target"}
    shared |= {"--compression", "--max-chunk-mb", "--lm-head-max-channels"}
    compile_flags, lm_flags = _flags("compile"), _flags("compile-lm")
    assert shared <= compile_flags and shared <= lm_flags
    assert compile_flags - {"--input"} <= lm_flags


def test_run_a_saved_package(tmp_path):
    """``anefx run``: the outputs' shapes and values summarized, from --input files or --random."""
    import numpy as np
    import torch

    import anefx
    from examples import models

    model, (x,), _ = models.mlp()
    out = anefx.compile(model, (x,), validate="off").save(tmp_path / "mlp.mlpackage")
    np.save(tmp_path / "x.npy", x.numpy())
    res = run("run", str(out), "--input", f"x={tmp_path / 'x.npy'}")
    assert res.returncode == 0, res.stderr[-2000:]
    with torch.no_grad():
        want = model(x)
    row = next(line for line in res.stdout.splitlines() if line.startswith("│ output"))
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[2:4] == ["4x32", "float16"] and cells[-1] == "0/0"
    assert abs(float(cells[4]) - float(want.min())) < 1e-2 and abs(float(cells[5]) - float(want.max())) < 1e-2
    assert "mil runtime" in res.stdout and "run " in res.stdout.splitlines()[-1]
    res = run("run", str(out), "--random")
    assert res.returncode == 0 and "x (random)" in res.stdout
    res = run("run", str(out))
    assert res.returncode == 2 and "no value for x (4x64 float32)" in res.stderr


def test_check_a_saved_package_against_the_model(tmp_path, capsys):
    """``anefx check PATH --against factory``: the package run on the example and random inputs
    against the model; exit 0 within tolerance, 1 (naming the output and the MIL op) otherwise."""
    import torch

    import anefx
    from anefx.cli import main
    from examples import models

    model, args, _ = models.mlp()
    good = anefx.compile(model, args, validate="off").save(tmp_path / "mlp.mlpackage")
    assert main(["check", str(good), "--against", "examples/models.py:mlp", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "every output within 0.01 of its scale" in out and "│ ok" in out
    other, args, _ = models.mlp(bias=False)  # same shapes, other weights: a wrong package for mlp
    ep = torch.export.export(other, args).run_decompositions({})  # converted by ct.convert alone
    ct.convert(ep, convert_to="mlprogram", skip_model_load=True).save(str(tmp_path / "other.mlpackage"))
    res = run("check", str(tmp_path / "other.mlpackage"), "--against", "examples/models.py:mlp")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "FAIL" in res.stdout and "MIL op #" in res.stdout and "(aten.linear)" in res.stdout
