"""Per-pass records and the report that prints them."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassRecord:
    """What one pass application did."""

    index: int
    name: str
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    validation_seconds: float = 0.0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    rolled_back: bool = False
    skipped: str | None = None
    error: str | None = None
    #: rewrite sites the pass declared (None: it declares none)
    sites: int | None = None
    #: sites dropped because they failed validation: site (node name), op, where (source line), error
    excluded_sites: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        if self.rolled_back:
            return "ROLLED BACK"
        if self.excluded_sites:
            return f"changed ({len(self.excluded_sites)} of {self.sites} sites excluded)"
        return "changed" if self.modified else "no change"


@dataclass
class Report:
    """The pipeline's records plus the hand-off's summary; prints as a table."""

    records: list[PassRecord] = field(default_factory=list)
    conversion: dict[str, Any] = field(default_factory=dict)
    #: Seconds per compile stage (see ``CompiledModel.timings``).
    timings: dict[str, float] = field(default_factory=dict)
    #: the never-worse guard (:mod:`anefx.driver.guard`): estimated layout changes of the captured
    #: and the rewritten graph, and every region kept in its original form, with its sites and why
    guard: dict[str, Any] = field(default_factory=dict)
    #: the converted program executed and compared with the model (:mod:`anefx.targets.verify`):
    #: per package (``main``, or ``chunk0`` … of a chain; ``compressed`` for a compressed package),
    #: per output the max abs error and the error relative to its scale, inf/NaN counts, and the fp16
    #: fallback when one ran
    artifact: dict[str, Any] = field(default_factory=dict)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.rolled_back]

    def record(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} ran; ran: {[r.name for r in self.records]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": [asdict(r) | {"status": r.status} for r in self.records],
            "conversion": self.conversion,
            "timings": self.timings,
            "guard": self.guard,
            "artifact": self.artifact,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kwargs)

    def rich_table(self):
        from rich.table import Table

        table = Table(title="anefx passes", show_lines=False)
        for col, justify in (
            ("#", "right"),
            ("pass", "left"),
            ("status", "left"),
            ("stats", "left"),
            ("time (s)", "right"),
            ("max abs err", "right"),
            ("max rel err (vs max |y|)", "right"),
        ):
            table.add_column(col, justify=justify)
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v) or "-"
            status = r.status if not r.error else f"{r.status}: {r.error}"
            style = "red" if r.rolled_back else ("green" if r.modified else None)
            table.add_row(
                str(r.index),
                r.name,
                status,
                stats,
                f"{r.seconds + r.validation_seconds:.3f}",
                _fmt(r.max_abs_error),
                _fmt(r.max_rel_error),
                style=style,
            )
        return table

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(self.rich_table())
        for r in self.records:
            for e in r.excluded_sites if not r.rolled_back else ():
                where = f" at {e['where']}" if e.get("where") else ""
                console.print(f"{r.name}: site %{e['site']} ({e['op']}){where} excluded: {e['error']}")
        for step, check in self.conversion.get("checks", {}).get("legalization", {}).items():
            for excluded in check.get("excluded", ()):
                console.print(f"hand-off {step}: site {excluded} excluded")
        for line in self.guard_lines():
            console.print(line)
        if self.conversion:
            console.print(" ".join(f"{k}={v}" for k, v in self.conversion.items() if not isinstance(v, dict)))
        for line in self.artifact_lines():
            console.print(line)
        if self.timings:
            console.print("stages (s): " + ", ".join(f"{k}={v:.2f}" for k, v in self.timings.items()))
        return buf.getvalue()

    def artifact_lines(self) -> list[str]:
        """One line per executed package: runtime, precision, worst error relative to an output's scale."""
        lines = []
        for where, check in self.artifact.items():
            if not isinstance(check, dict) or "outputs" not in check:
                lines.append(f"artifact {where}: {check}")
                continue
            worst = max((o["rel_error"] for o in check["outputs"].values()), default=0.0)
            bad = sum(o["nonfinite"] for o in check["outputs"].values())
            line = (
                f"artifact {where} ({check['runtime']}, {check['precision']}, {check['input_sets']} input sets): "
                f"{'ok' if check['ok'] else 'FAILED'}, worst error {worst:.2e} of an output's scale"
                f" (tolerance {check['tolerance']:g}), {bad} inf/NaN"
            )
            if check.get("fallback"):
                line += f"; fp16 fallback: {len(check['fallback']['fp32_nodes'])} node(s) in fp32"
            lines.append(line)
        return lines

    def guard_lines(self) -> list[str]:
        """Lines for the report and the CLI: the counts and each kept region."""
        info = self.guard
        if not info:
            return []

        def n(c):
            return c["transpose"] + c["reshape"]

        lines = [
            f"never worse than stock (estimated transposes + reshapes): stock {n(info['stock'])}, "
            f"anefx {n(info['anefx_before'])}"
            + (
                f" -> {n(info['anefx'])} (the stock form)"
                if info.get("shipped") == "stock" and not info.get("fallback")
                else f" -> {n(info['anefx'])} after keeping {len(info['kept'])} region(s)"
                if info["kept"] and not info.get("fallback")
                else ""
            )
            + f" ({info['regions']} regions, {info['reruns']} re-runs, {info.get('seconds', 0.0):.2f}s)"
        ]
        if info.get("shipped") == "stock":
            lines.append(
                f"  the guard's refusals left {n(info['worse_counts'])} layout changes (outside its regions): "
                "shipped the stock form of the validated captured graph (canonicalize, fold_constants, "
                "fp16_mask_values only)"
            )
        if info.get("worse_than_stock"):
            lines.append("  WORSE than stock after the guard: the extra layout changes are outside its regions")
        if info.get("fallback"):
            lines.append(f"  {info['fallback']}")
        for k in info["kept"]:
            first = k["sites"][0]
            where = f" at {first['where']}" if first.get("where") else ""
            ops = ", ".join(f"%{s['site']} ({s['op']}, {s['pass']})" for s in k["sites"][:4])
            more = f" and {len(k['sites']) - 4} more" if len(k["sites"]) > 4 else ""
            verb = "would keep" if info.get("fallback") else "kept"
            lines.append(
                f"  {verb} region {k['region']} in its original form{where}: {ops}{more}; "
                f"{k['reason']} (after: {k['after']})"
            )
        return lines


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"
