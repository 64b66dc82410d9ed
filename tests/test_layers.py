"""anefx's layers: each imports only the layers below it, and no module takes part in an import cycle.

The layers, bottom to top (docs/architecture.md draws them):

0. ``anefx.compat``    the seams to torch's, coremltools' and coreai's private APIs (nothing of anefx)
1. ``anefx.ir``        the canonical graph: fx helpers, capture, errors
2. ``anefx.analysis``  analyses over it: layout vocabulary, heads, masks, in-place writes
3. ``anefx.passes``    one rewrite per file
4. ``anefx.driver``    pipeline, validation, instruments, reports, reproducers, bisection
5. ``anefx.targets``   the Target interface, Core ML and Core AI, the artifact type, chunking, compression
6. ``anefx.ane``       static ANE analysis of a converted program
7. ``anefx.core``      the one sequence of stages, CompileOptions, the shared result
8. front ends and API  ``anefx.compile``, ``anefx.lm``, ``anefx.check``, backend, CLI, catalog

Every import counts, also function-local and ``TYPE_CHECKING`` ones: a cycle hidden behind either
breaks as soon as someone moves the import to the top of the file.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "anefx"
LAYERS = ["compat", "ir", "analysis", "passes", "driver", "targets", "ane", "core"]  # anything else is a front end


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)


def imports(module: str) -> set[str]:
    """The anefx modules ``module`` imports, anywhere in the file."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for m in MODULES:
        g.add_node(m)
        for dep in imports(m):
            g.add_edge(m, dep)
    return g


def test_every_import_goes_down_or_sideways():
    upward = [
        f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)})"
        for m in MODULES
        for dep in imports(m)
        if layer(dep) > layer(m) and dep != "anefx"
    ]
    upward += [
        f"{m} imports the anefx package (the public API)"
        for m in MODULES
        if "anefx" in imports(m) and layer(m) < len(LAYERS)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    g = import_graph()
    g.remove_node("anefx")  # the package __init__ re-exports the API; nothing below imports it (checked above)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:10])


def test_the_layer_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    planted = tmp_path / "graph.py"
    planted.write_text("def f():\n    from anefx.compile import compile\n")
    monkeypatch.setitem(MODULES, "anefx.ir.graph", planted)
    assert "anefx.compile" in imports("anefx.ir.graph")
    with pytest.raises(AssertionError, match=r"anefx.ir.graph \(layer 1\) imports anefx.compile"):
        test_every_import_goes_down_or_sideways()


PASS_INTERFACE = "anefx.passes.base"  # the Pass interface every pass imports; not a pass


def pass_modules() -> set[str]:
    return {m for m in MODULES if m.startswith("anefx.passes.") and m != PASS_INTERFACE}


def test_no_pass_imports_another_pass():
    """Passes stay passes: what two passes share lives in ``anefx.analysis`` (or the IR), and a pass
    that needs another one's effect declares ``runs_after``; ``anefx.passes`` (the list) imports them all."""
    passes = pass_modules()
    found = [f"{m} imports {dep}" for m in sorted(passes) for dep in sorted(imports(m)) if dep in passes]
    assert not found, "\n".join(found)


def test_the_pass_checker_sees_a_planted_pass_import(tmp_path, monkeypatch):
    planted = tmp_path / "to_bc1s.py"
    planted.write_text("def run(gm):\n    from anefx.passes.fold_transposes import FoldTransposes\n")
    monkeypatch.setitem(MODULES, "anefx.passes.to_bc1s", planted)
    with pytest.raises(AssertionError, match=r"anefx\.passes\.to_bc1s imports anefx\.passes\.fold_transposes"):
        test_no_pass_imports_another_pass()


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_alone_in_any_order(seed):
    """Fresh interpreters import every module, in a random order each."""
    order = list(MODULES)
    random.Random(seed).shuffle(order)
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *order], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
