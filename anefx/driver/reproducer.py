"""Reproducers: the graph just before a failing pass plus the pipeline that ran, loadable in one call.

A reproducer directory holds ``graph.pt2`` (the graph as a ``torch.export`` program, loaded without
unpickling arbitrary objects), ``inputs.pt`` (the example inputs, loaded with ``weights_only=True``)
and ``pipeline.json`` (pass names, options, which one failed and why).

    gm, inputs, info = anefx.load_reproducer("dump/reproducer_03_to_bc1s")
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.driver.report import PassRecord
from anefx.driver.validate import run_flat
from anefx.passes.base import Pass


def write_reproducer(
    directory: Path,
    gm: torch.fx.GraphModule,
    inputs: list,
    passes: Sequence[Pass],
    failed_index: int,
    record: PassRecord,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inputs = list(inputs)
    info: dict[str, Any] = {
        "failed_pass": record.name,
        "failed_index": failed_index,
        "error": record.error,
        "pipeline": [
            {
                "name": p.name,
                "class": f"{type(p).__module__}.{type(p).__qualname__}",
                "options": dataclasses.asdict(p.options) if dataclasses.is_dataclass(p.options) else {},
            }
            for p in passes
        ],
    }
    try:
        ep = torch.export.export(_FlatWrapper(gm), tuple(inputs), strict=False)
        torch.export.save(ep, directory / "graph.pt2")
    except Exception as exc:  # keep the readable graph even when it cannot be exported
        info["export_error"] = f"{type(exc).__name__}: {exc}"
    (directory / "graph.py").write_text(gm.code)
    torch.save(inputs, directory / "inputs.pt")
    (directory / "pipeline.json").write_text(json.dumps(info, indent=2, default=str))
    return directory


class _FlatWrapper(torch.nn.Module):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *flat):
        return tuple(run_flat(self.gm, flat))


def load_reproducer(directory) -> tuple[torch.fx.GraphModule, list, dict]:
    """Load a reproducer: (graph module taking flat inputs, flat example inputs, pipeline info)."""
    directory = Path(directory)
    info = json.loads((directory / "pipeline.json").read_text())
    inputs = torch.load(directory / "inputs.pt", weights_only=True)
    ep = torch.export.load(directory / "graph.pt2")
    return ep.module(), list(inputs), info
