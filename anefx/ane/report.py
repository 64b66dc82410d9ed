"""The ANE readiness report of a converted Core ML program (``anefx.check`` builds it for a model).

For every MIL op of the converted program it applies the rules of :mod:`anefx.ane.rules` and names
the op, the rule, the rule's source and the user's source line (through the node the op came from).
It adds the fp16 range check (:mod:`anefx.ane.fp16`), a roofline estimate per chip
(:mod:`anefx.ane.estimate`) and, on macOS with ``MLComputePlan``, the device Core ML really picks.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from anefx.ane.estimate import CHIPS, Estimate, OpCost, op_cost
from anefx.ane.fp16 import RangeFinding, check_fp16_range
from anefx.ane.rules import KNOWN_ANE_OPS, RULES, UNKNOWN_SOURCE, OpInfo
from anefx.ane.traffic import Traffic, estimate_traffic
from anefx.targets.coreml import runtime_available
from anefx.targets.localize import fx_name


@dataclass
class Finding:
    op: str  # MIL op name
    op_type: str
    rule: str
    verdict: str
    reason: str
    source: str
    location: str | None
    device: str | None = None  # from MLComputePlan, on macOS


@dataclass
class ANEReport:
    findings: list[Finding] = field(default_factory=list)
    fp16: list[RangeFinding] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    compute_plan: str = ""  # why the real-device column is absent, or "MLComputePlan"
    op_count: int = 0
    costs: list[OpCost] = field(default_factory=list)  # the estimate's per-op FLOPs and bytes
    traffic: list[Traffic] = field(default_factory=list)  # bytes per call, one per package of the chain

    def by_rule(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.rule, []).append(f)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": self.op_count,
            "findings": [asdict(f) for f in self.findings],
            "fp16_range": [asdict(f) for f in self.fp16],
            "estimate": self.estimate,
            "traffic": [t.to_dict() for t in self.traffic],
            "compute_plan": self.compute_plan,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def rich_tables(self) -> list:
        from rich.table import Table

        t = Table(title=f"ANE readiness: {len(self.findings)} of {self.op_count} ops flagged (predictions)")
        for col in ("op", "MIL type", "verdict", "rule", "why", "your code"):
            t.add_column(col)
        with_device = any(f.device for f in self.findings)
        if with_device:
            t.add_column("Core ML device")
        for f in self.findings:
            row = [f.op, f.op_type, f.verdict, f.rule, f.reason, f.location or "-"]
            t.add_row(*row, *([f.device or "-"] if with_device else []))
        tables = [t]
        if self.fp16:
            r = Table(title="fp16 range (run in fp32 on the example inputs)")
            for col in ("node", "|x| max", "problem", "fix", "your code"):
                r.add_column(col)
            for f in self.fp16:
                r.add_row(f.op, f"{f.absmax:.3g}", f.problem, f.fix or "-", f.location or "-")
            tables.append(r)
        e = Table(title=self.estimate.get("label", "estimate"))
        e.add_column("measure")
        e.add_column("value", justify="right")
        keys = ("gflops", "padded_activation_mib", "weight_mib", "layout_change_ops", "layout_change_ops_moving_data")
        for key in (*keys, "layout_change_mib"):
            e.add_row(key, str(self.estimate.get(key)))
        for chip, ms in self.estimate.get("ms_per_chip", {}).items():
            e.add_row(f"latency on {chip} (ms)", str(ms))
        tables.append(e)
        if self.traffic:
            tables.append(traffic_table(self.traffic))
        return tables

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=180, color_system=None)
        for t in self.rich_tables():
            console.print(t)
        console.print(f"real per-op devices: {self.compute_plan}")
        return buf.getvalue()


def _op_info(op) -> tuple[OpInfo, list, list]:
    from coremltools.converters.mil.mil import types

    dtypes, shapes = [], []
    for v in op.outputs:
        dt = v.dtype
        dtypes.append(types.builtin_to_string(dt) if dt is not None else "?")
        try:
            shapes.append(tuple(int(s) for s in v.shape))
        except (TypeError, ValueError):
            shapes.append(None)
    const_inputs, in_shapes, weights, attrs = set(), [], [], {}
    for key, var in op.inputs.items():
        vars_ = var if isinstance(var, (list, tuple)) else [var]
        for v in vars_:
            is_const = v.op is not None and v.op.op_type == "const"
            shape = tuple(int(s) for s in v.shape) if hasattr(v, "shape") and v.shape is not None else None
            if is_const:
                const_inputs.add(key)
                if key == "weight" and shape:
                    weights.append(shape)
                if key in ("dilations", "equation", "perm") and v.val is not None:
                    val = v.val
                    attrs[key] = str(val) if key == "equation" else tuple(int(x) for x in val)
            else:
                in_shapes.append(shape)
    info = OpInfo(op.name, op.op_type, tuple(dtypes), tuple(shapes), frozenset(const_inputs), attrs)
    return info, in_shapes, weights


def _locations(*graphs) -> dict[str, str]:
    """MIL op names come from torch node names: map both to the user's file:line."""
    from anefx.ir.graph import source_location

    out: dict[str, str] = {}
    for gm in graphs:
        if gm is None:
            continue
        for node in gm.graph.nodes:
            loc = source_location(node)
            if loc:
                out.setdefault(node.name, loc)
    return out


def _lookup(name: str, locations: dict[str, str]) -> str | None:
    """The user's file:line of the torch node a MIL op comes from (:func:`fx_name`)."""
    node, _ = fx_name(name, locations)
    return locations.get(node) if node is not None else None


def _compute_plan(package, function: str) -> tuple[dict[str, str], str]:
    """Real per-op devices from MLComputePlan (macOS only)."""
    ok, why = runtime_available()
    if not ok:
        return {}, f"absent: {why} (MLComputePlan needs Core ML)"
    try:  # pragma: no cover - macOS only
        import tempfile

        from coremltools.models import MLModel
        from coremltools.models.compute_plan import MLComputePlan

        with tempfile.TemporaryDirectory() as tmp:
            path = package.save(f"{tmp}/m.mlpackage")
            several = len(package.functions) > 1
            model = MLModel(str(path), **({"function_name": function} if several else {}))
            plan = MLComputePlan.load_from_path(model.get_compiled_model_path())
            devices = {}
            name = function if several else "main"
            for op in plan.model_structure.program.functions[name].block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                if usage is not None and op.outputs:
                    devices[op.outputs[0].name] = type(usage.preferred_compute_device).__name__
        return devices, "MLComputePlan"
    except Exception as exc:  # pragma: no cover
        return {}, f"absent: MLComputePlan failed ({type(exc).__name__}: {exc})"


def analyse(artifact, function: str | None = None, graph_module=None, flat_inputs=None) -> ANEReport:
    """The report of one function of a converted artifact (one package, or every package of a chain:
    op names then prefixed ``chunk<i>/``, one estimate for the chain), with the fp16 range check of
    the rewritten graph it came from (``graph_module`` on ``flat_inputs``) when given."""
    function = function or artifact.default
    notes = set()
    report = ANEReport()
    estimate = Estimate()
    for program in artifact.programs:
        package = program.package
        if function not in package.functions:  # a chunk without this function (an encoder chunk)
            continue
        prefix = f"chunk{program.index}/" if artifact.chunked else ""
        handoff = program.functions.get(function)
        graphs = (package.function(function).exported_graph, handoff.graph_module if handoff else None)
        devices, plan_note = _compute_plan(package, function)
        notes.add(plan_note)
        name = f"{prefix}{function}" if prefix else function
        _scan(package.operations(function), _locations(*graphs), devices, prefix, name, report, estimate)
    report.compute_plan = "; ".join(sorted(notes))
    report.costs = estimate.ops
    report.estimate = estimate.to_dict()
    report.estimate["chips"] = sorted(CHIPS)
    report.fp16 = check_fp16_range(graph_module, flat_inputs) if graph_module is not None else []
    return report


def _scan(operations, locations, devices, prefix: str, name: str, report: ANEReport, estimate: Estimate) -> None:
    """Apply every rule to the ops of one Core ML program, and estimate what they cost."""
    traffic = estimate_traffic(operations, name)
    report.traffic.append(traffic)
    moved = {t.name: t for t in traffic.ops}
    for op in operations:
        if op.op_type == "const":
            continue
        report.op_count += 1
        info, in_shapes, weights = _op_info(op)
        if op.name in moved:
            estimate.ops.append(op_cost(info, in_shapes, weights, moved[op.name]))
        location = _lookup(op.name, locations)
        out_name = op.outputs[0].name if op.outputs else op.name
        flagged = False
        for rule in RULES:
            reason = rule.check(info)
            if reason:
                flagged = True
                report.findings.append(
                    Finding(
                        prefix + op.name,
                        op.op_type,
                        rule.id,
                        rule.verdict,
                        reason,
                        rule.source,
                        location,
                        devices.get(out_name),
                    )
                )
        if not flagged and op.op_type not in KNOWN_ANE_OPS and op.op_type != "cast":
            report.findings.append(
                Finding(
                    prefix + op.name,
                    op.op_type,
                    "unknown",
                    "unknown",
                    f"no rule covers {op.op_type}",
                    UNKNOWN_SOURCE,
                    location,
                )
            )


def add_unmatched_attention(report: ANEReport, records) -> None:
    """Attention a pass left in stock form (its ``unmatched_reasons`` stat), one finding each."""
    for record in records:
        if record.rolled_back:
            continue
        for reason, count in (record.stats.get("unmatched_reasons") or {}).items():
            for _ in range(count):
                finding = Finding("attention", "attention", "unmatched_attention", "slow", reason, record.name, None)
                report.findings.append(finding)


def traffic_table(traffic: list[Traffic]):
    """Bytes per call of each package, against the floor (weights + states read once)."""
    from rich.table import Table

    from anefx.ane.traffic import LABEL

    t = Table(title=f"memory traffic per call: {LABEL}")
    for col in ("program", "total MB", "weights MB", "states MB", "state reads MB", "floor MB", "x floor", "largest"):
        t.add_column(col, justify="right" if col != "largest" else "left")
    for tr in traffic:
        d = tr.to_dict()
        top = ", ".join(f"{k} {v}" for k, v in list(d["by_op_type_mb"].items())[:3])
        row = (d["total_mb"], d["weights_mb"], d["state_mb"], d["state_read_mb"], d["floor_mb"], d["times_floor"], top)
        t.add_row(tr.function, *(str(x) for x in row))
    return t


def compare_estimates(reports: dict[str, ANEReport]):
    """A table of the estimates of several reports side by side (e.g. stock vs anefx), with the
    memory-traffic ESTIMATE of one call (:mod:`anefx.ane.traffic`) when every report has it."""
    from rich.table import Table

    t = Table(title="ANE estimate side by side (roofline ESTIMATE, not a measurement)")
    t.add_column("measure")
    for label in reports:
        t.add_column(label, justify="right")
    rows = ["gflops", "padded_activation_mib", "weight_mib", "layout_change_ops", "layout_change_ops_moving_data"]
    rows.append("layout_change_mib")
    for key in rows:
        t.add_row(key, *(str(r.estimate.get(key)) for r in reports.values()))
    chips = next(iter(reports.values())).estimate.get("ms_per_chip", {})
    for chip in chips:
        t.add_row(f"latency on {chip} (ms)", *(str(r.estimate["ms_per_chip"][chip]) for r in reports.values()))
    t.add_row("flagged ops", *(str(len(r.findings)) for r in reports.values()))
    if all(r.traffic for r in reports.values()):  # summed over the packages of a chain
        for label, key in (("traffic per call (MB)", "total"), ("traffic floor (MB)", "floor")):
            t.add_row(label, *(f"{sum(getattr(tr, key) for tr in r.traffic) / 1e6:.3f}" for r in reports.values()))
        t.add_row("traffic of transpose + reshape (MB)", *(f"{_layout_traffic(r) / 1e6:.3f}" for r in reports.values()))
    return t


def _layout_traffic(report: ANEReport) -> int:
    """Estimated bytes the layout changes (``transpose``, ``reshape``) of every package move."""
    return sum(o.total for tr in report.traffic for o in tr.ops if o.op_type in ("transpose", "reshape"))
