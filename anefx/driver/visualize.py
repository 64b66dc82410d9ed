"""Pictures of graphs for the dump directory: torch's ``FxGraphDrawer`` (pydot/graphviz).

Nodes are coloured by layout: (B, C, 1, S) tensors blue, other tensors grey; nodes a pass added or
changed are drawn with a red border. The ``.dot`` source is always written; an ``.svg`` is rendered
when the graphviz ``dot`` program is installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.fx

from anefx.ir.graph import shape

_BC1S = "#9ecae1"
_OTHER = "#e0e0e0"


def _is_bc1s(node: torch.fx.Node) -> bool:
    s = shape(node)
    return s is not None and len(s) == 4 and s[2] == 1


def draw_graph(gm: torch.fx.GraphModule, stem: Path, changed_from: torch.fx.GraphModule | None = None) -> Path | None:
    """Write ``stem.dot`` (and ``stem.svg`` when graphviz is installed); return the picture or the .dot."""
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError:  # pydot missing
        return None
    old = {n.format_node() for n in changed_from.graph.nodes} if changed_from is not None else set()
    try:
        drawer = FxGraphDrawer(gm, "anefx", ignore_getattr=True, ignore_parameters_and_buffers=True)
        dot = drawer.get_main_dot_graph()
    except Exception:
        return None
    by_name = {n.name: n for n in gm.graph.nodes}
    for dnode in dot.get_nodes():
        name = dnode.get_name().strip('"')
        node = by_name.get(name)
        if node is None:
            continue
        label = dnode.get_label()
        if label and ("<" in label or ">" in label):  # e.g. einsum equations: '<'/'>' are record ports
            dnode.set_label(label.replace("<", "\\<").replace(">", "\\>"))
        dnode.set_fillcolor(_BC1S if _is_bc1s(node) else _OTHER)
        if old and node.format_node() not in old:
            dnode.set_color("red")
            dnode.set_penwidth("3")
    stem = Path(stem)
    dot_path = stem.with_suffix(".dot")
    dot_path.write_text(dot.to_string())
    if shutil.which("dot"):
        svg = stem.with_suffix(".svg")
        try:
            dot.write_svg(str(svg))
            return svg
        except Exception:
            return dot_path
    return dot_path
