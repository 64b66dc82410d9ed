"""The ANE readiness report (anefx.check)."""

import inspect
import json
import math
from pathlib import Path

import torch
import transformers
from torch import nn

import anefx
from anefx.ane.estimate import CHIPS
from anefx.ane.rules import RULES, OpInfo, padding_factor
from helpers import example


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, ids):
        x = self.emb(ids)  # LINE_EMB
        y, _ = self.lstm(x)  # LINE_LSTM
        return torch.relu(self.fc(y)) + 100000.0  # LINE_FP32: beyond fp16, coremltools keeps it fp32


def _line(tag: str) -> str:
    src = Path(__file__).read_text().splitlines()
    return f"{__file__}:{next(i + 1 for i, ln in enumerate(src) if ln.rstrip().endswith(tag) or tag + ':' in ln)}"


def test_embedding_lstm_and_fp32_op_are_named_with_rule_source_and_line():
    report = anefx.check(Mixed().eval(), (torch.randint(0, 100, (1, 8)),))
    by_rule = report.by_rule()
    gather = by_rule["gather"][0]
    assert gather.op_type == "gather" and gather.location == _line("# LINE_EMB")
    assert "hollance" in gather.source and gather.verdict == "off_ane"
    lstm = by_rule["recurrent"][0]
    assert lstm.op_type == "lstm" and lstm.location == _line("# LINE_LSTM")
    assert "coremltools issue #337" in lstm.source
    fp32 = [f for f in by_rule["fp32_compute"] if f.op_type == "add"]
    assert fp32 and fp32[0].location == _line("# LINE_FP32")
    assert any("overflows fp16" in f.problem for f in report.fp16)
    data = json.loads(report.to_json())
    assert {f["rule"] for f in data["findings"]} >= {"gather", "recurrent", "fp32_compute"}
    assert "absent" in report.compute_plan or report.compute_plan == "MLComputePlan"
    text = str(report)
    assert "ANE readiness" in text and "ESTIMATE" in text


def test_clean_distilbert_reports_only_its_embedding():
    model, args, kwargs = example("distilbert_small")
    report = anefx.compile(model, args, kwargs).ane_report
    assert [(f.op_type, f.rule) for f in report.findings] == [("gather", "gather")]
    # the line of the user's (here: transformers') code that embeds the ids, found in its source
    source, first = inspect.getsourcelines(transformers.models.distilbert.modeling_distilbert.Embeddings.forward)
    line = first + next(i for i, t in enumerate(source) if "self.word_embeddings(input_ids)" in t)
    assert report.findings[0].location.endswith(f"modeling_distilbert.py:{line}")
    assert report.fp16 == []


class Fp32MinMask(nn.Module):
    def forward(self, scores, mask):
        add = (1.0 - mask[:, None, :].float()) * torch.finfo(torch.float32).min
        return torch.softmax(scores + add, dim=-1)


def test_fp16_check_flags_fp32_min_mask_and_the_fix_pass_removes_it():
    args = (torch.randn(1, 4, 4), torch.tensor([[1, 1, 1, 0]]))
    without = anefx.check(Fp32MinMask(), args, pipeline=anefx.Pipeline.default().without("fp16_mask_values"))
    flagged = [f for f in without.fp16 if "fp32 extreme" in f.problem]
    assert flagged and flagged[0].fix.startswith("the fp16_mask_values pass")
    compiled = anefx.compile(Fp32MinMask(), args)
    rec = compiled.report.record("fp16_mask_values")
    assert rec.modified and not rec.rolled_back and rec.max_abs_error < 1e-6
    assert not [f for f in compiled.ane_report.fp16 if "fp32 extreme" in f.problem]


def test_rules_are_data_with_sources():
    assert len({r.id for r in RULES}) == len(RULES)
    for r in RULES:
        assert r.source and r.verdict in ("off_ane", "slow")
    by_id = {r.id: r for r in RULES}
    op = OpInfo("x", "conv", ("fp16",), ((1, 1024, 1, 1),), frozenset(), {})
    assert by_id["last_axis_padding"].check(op) is None  # too small to matter
    big = OpInfo("x", "conv", ("fp16",), ((1, 4096, 64, 1),), frozenset(), {})
    assert "32x" in by_id["last_axis_padding"].check(big)
    assert padding_factor((1, 768, 1, 128)) == 1.0 and padding_factor((1, 8, 1, 1)) == 32.0
    assert by_id["rank"].check(OpInfo("x", "add", ("fp16",), ((1, 2, 3, 4, 5, 6),), frozenset(), {}))
    assert by_id["dimension_limit"].check(OpInfo("x", "add", ("fp16",), ((1, 20000),), frozenset(), {}))
    assert by_id["int_tensor"].check(OpInfo("x", "add", ("int32",), ((4,),), frozenset(), {}))
    assert by_id["dynamic_indexing"].check(OpInfo("x", "slice_by_index", ("fp16",), ((4,),), frozenset(), {}))
    assert by_id["dilated_conv"].check(
        OpInfo("x", "conv", ("fp16",), ((1, 4, 4, 4),), frozenset(), {"dilations": (2, 2)})
    )


def test_unknown_ops_are_reported_as_unknown():
    class Cum(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=-1)

    report = anefx.check(Cum(), (torch.randn(2, 8),))
    unknown = [f for f in report.findings if f.rule == "unknown"]
    assert unknown and unknown[0].op_type == "cumsum" and "does not guess" in unknown[0].source


def test_estimate_stock_vs_anefx_distilbert():
    from rich.console import Console

    from anefx.ane.report import compare_estimates

    model, args, kwargs = example("distilbert_small")
    ours = anefx.compile(model, args, kwargs).ane_report
    stock = anefx.compile(model, args, kwargs, pipeline=anefx.Pipeline.empty()).ane_report
    anefx_est, stock_est = ours.estimate, stock.estimate
    assert anefx_est["layout_change_ops"] < stock_est["layout_change_ops"]
    assert anefx_est["layout_change_mib"] < stock_est["layout_change_mib"]
    assert math.isclose(anefx_est["gflops"], stock_est["gflops"], rel_tol=0.05)
    assert set(anefx_est["ms_per_chip"]) == set(CHIPS) and "ESTIMATE" in anefx_est["label"]
    for chip in CHIPS.values():
        assert chip.source and chip.tops > 0
    # the traffic ESTIMATE side by side: fewer bytes through layout changes
    console = Console(width=200, color_system=None, record=True)
    console.print(compare_estimates({"stock": stock, "anefx": ours}))
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
        for line in console.export_text().splitlines()
        if line.count("│") == 4
    }
    layout = [float(x) for x in rows["traffic of transpose + reshape (MB)"]]
    assert layout[1] < layout[0], rows
    floor = [float(x) for x in rows["traffic floor (MB)"]]
    assert floor[1] == round(sum(t.floor for t in ours.traffic) / 1e6, 3) > 0, rows
    assert float(rows["traffic per call (MB)"][1]) > floor[1], rows


def test_which_layout_changes_copy_memory_in_the_padded_layout():
    from anefx.analysis.layout import moves_data

    assert not moves_data((2, 320, 64, 64), (2, 320, 1, 4096))  # hand-over, rows of 128 B: nothing padded
    assert not moves_data((2, 640, 32, 32), (2, 640, 1, 1024))  # rows of 64 B
    assert moves_data((2, 1280, 16, 16), (2, 1280, 1, 256))  # rows of 32 B are padded to 64
    assert not moves_data((2, 320, 64, 64), (2, 32, 640, 64))  # GroupNorm's view keeps the last axis
    assert moves_data((2, 64, 1, 77), (2, 77, 1, 64), perm=[0, 3, 2, 1])  # a K transpose
    assert not moves_data((2, 64, 1, 1), (2, 1, 64, 1), perm=[0, 2, 1, 3])  # only unit axes move
    assert moves_data((2, 1, 64), (2, 64, 1, 1))  # a (B, 1, C) vector as (B, C, 1, 1): 64 B per value
