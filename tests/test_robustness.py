"""Determinism, and the user's model untouched under every entry point."""

import copy
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anefx
from anefx.driver.bisect import bisect
from anefx.ir.graph import format_graph
from anefx.targets import coreai
from helpers import example

ROOT = Path(__file__).resolve().parents[1]


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    (_, mismatch, errors) = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_same_model_twice_gives_identical_graphs_and_bytes(tmp_path):
    model, args, kwargs = example("distilbert_small")
    first = anefx.compile(model, args, kwargs)
    second = anefx.compile(model, args, kwargs)
    assert format_graph(first.graph_module) == format_graph(second.graph_module)
    first.save(tmp_path / "a.mlpackage")
    second.save(tmp_path / "b.mlpackage")
    assert _same_tree(tmp_path / "a.mlpackage", tmp_path / "b.mlpackage")


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import anefx
from examples.models import tiny_attention
model, args, kwargs = tiny_attention()
anefx.compile(model, args, kwargs).save(sys.argv[1])
"""


def test_bytes_do_not_depend_on_the_process(tmp_path):
    """Protobuf map order and coremltools' random UUIDs would differ between processes; anefx pins them."""
    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    for i, seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"{i}.mlpackage")], env=env, capture_output=True
        )
        assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert _same_tree(tmp_path / "0.mlpackage", tmp_path / "1.mlpackage")


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(type(m).__name__, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
        sorted(n for n, _ in model.named_parameters()),
    )


def _assert_same(model, snap):
    state, training, hooks, names = snap
    now = _snapshot(model)
    assert now[1] == training and now[2] == hooks and now[3] == names
    for k, v in now[0].items():
        assert torch.equal(v, state[k]), k


ENTRY_POINTS = ["capture", "compile", "check", "backend", "bisect", "coreai"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_user_model_is_never_mutated(entry):
    if entry == "coreai" and not coreai.available()[0]:
        pytest.skip(coreai.available()[1])
    model, args, kwargs = example("tiny_attention")
    model.train()  # anefx must restore the mode it found, per module
    model.q.eval()
    snap = _snapshot(model)
    reference = copy.deepcopy(model)
    if entry == "capture":
        anefx.capture(model, args, kwargs)
    elif entry == "compile":
        anefx.compile(model, args, kwargs)
    elif entry == "check":
        anefx.check(model, args, kwargs)
    elif entry == "backend":
        torch._dynamo.reset()
        torch.compile(model.eval(), backend=anefx.backend())(*args, **kwargs)
        model.train()
        model.q.eval()
    elif entry == "bisect":
        bisect(model, args, kwargs)
    elif entry == "coreai":
        anefx.compile(model, args, kwargs, target="coreai")
    _assert_same(model, snap)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(*args), reference(*args))
