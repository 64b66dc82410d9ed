"""Pipeline instrumentation: print-IR, dump directory, opt-bisect lines, reproducers.

All of it is driven by :class:`anefx.driver.debug.DebugOptions`; with the defaults nothing is printed or
written and the cost is nil.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from anefx.driver.debug import DebugOptions
from anefx.driver.report import PassRecord
from anefx.driver.reproducer import write_reproducer
from anefx.driver.visualize import draw_graph
from anefx.ir.graph import format_graph
from anefx.passes.base import Pass


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph, one node per line with its shape (see :func:`anefx.ir.graph.format_graph`)."""
    return format_graph(gm)


class Instruments:
    def __init__(self, debug: DebugOptions, passes: Sequence[Pass], flat_inputs=(), stream=None):
        self.debug = debug
        self.flat_inputs = list(flat_inputs)
        self.passes = tuple(passes)
        self.stream = stream or sys.stderr
        self.dump_dir = Path(debug.dump_dir) if debug.dump_dir else None
        self.summary: list[dict[str, Any]] = []

    # -- hooks ------------------------------------------------------------------------------
    def start(self, gm: torch.fx.GraphModule) -> None:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00_input.txt").write_text(graph_text(gm))

    def bisect_line(self, index: int, name: str, ran: bool) -> None:
        if self.debug.bisect_limit is None or self.debug.quiet:
            return
        verb = "running" if ran else "NOT running"
        print(f"BISECT: {verb} pass ({index}) {name}", file=self.stream)

    def before(self, index: int, p: Pass, gm: torch.fx.GraphModule) -> None:
        if p.name in self.debug.print_ir_before:
            self._print(f"IR Dump Before {p.name} ({index})", gm)

    def after(self, index: int, p: Pass, before: torch.fx.GraphModule, after: torch.fx.GraphModule, rec: PassRecord):
        d = self.debug
        if rec.excluded_sites and not d.quiet:
            for e in rec.excluded_sites:
                where = f" at {e['where']}" if e.get("where") else ""
                print(
                    f"anefx: pass {p.name} ({index}): site %{e['site']} ({e['op']}){where} excluded: {e['error']}",
                    file=self.stream,
                )
        if d.print_ir_after_all or p.name in d.print_ir_after or (d.print_ir_after_change and rec.modified):
            self._print(f"IR Dump After {p.name} ({index})", after)
        if self.dump_dir:
            self._dump(index, p, before, after, rec)

    def failed(
        self, index: int, p: Pass, before: torch.fx.GraphModule, rec: PassRecord, exc: BaseException | None
    ) -> None:
        if not self.debug.quiet:
            print(f"anefx: pass {p.name} ({index}) rolled back: {rec.error}", file=self.stream)
        if self.dump_dir:
            self._dump(index, p, before, before, rec)
        target = self.debug.reproducer_dir
        if target is None and self.dump_dir is not None:
            target = self.dump_dir / f"reproducer_{index:02d}_{p.name}"
        if target is not None:
            path = write_reproducer(target, before, self.flat_inputs, self.passes, index, rec)
            rec.stats["reproducer"] = str(path)

    def finish(self, gm: torch.fx.GraphModule, records: list[PassRecord]) -> None:
        if self.dump_dir:
            (self.dump_dir / "99_output.txt").write_text(graph_text(gm))
            (self.dump_dir / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))

    # -- helpers ----------------------------------------------------------------------------
    def _print(self, title: str, gm: torch.fx.GraphModule) -> None:
        print(f"// ----- {title} ----- //", file=self.stream)
        print(graph_text(gm), file=self.stream)

    def _dump(self, index: int, p: Pass, before, after, rec: PassRecord) -> None:
        assert self.dump_dir is not None
        stem = f"{index + 1:02d}_{p.name}"
        a, b = graph_text(before), graph_text(after)
        (self.dump_dir / f"{stem}.before.txt").write_text(a)
        (self.dump_dir / f"{stem}.after.txt").write_text(b)
        diff = difflib.unified_diff(
            a.splitlines(keepends=True), b.splitlines(keepends=True), f"{stem}.before.txt", f"{stem}.after.txt"
        )
        (self.dump_dir / f"{stem}.diff").write_text("".join(diff))
        entry = {
            "index": index,
            "pass": p.name,
            "status": rec.status,
            "modified": rec.modified,
            "rolled_back": rec.rolled_back,
            "error": rec.error,
            "max_abs_error": rec.max_abs_error,
            "max_rel_error": rec.max_rel_error,
            "seconds": rec.seconds,
            "validation_seconds": rec.validation_seconds,
            "stats": rec.stats,
            "excluded_sites": rec.excluded_sites,
        }
        (self.dump_dir / f"{stem}.error.json").write_text(json.dumps(entry, indent=2, default=str))
        self.summary.append(entry)
        if rec.modified and not rec.rolled_back:
            picture = draw_graph(after, self.dump_dir / stem, changed_from=before)
            if picture is not None:
                entry["picture"] = picture.name
