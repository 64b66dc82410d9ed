"""Stage timing and progress as one instrument (anefx.driver.events), read by the report and the CLI."""

from __future__ import annotations

import pytest

import anefx
from anefx.driver.events import Events
from helpers import example


def test_stages_nest_steps_do_not_time_and_errors_still_end_the_stage():
    seen = []
    events = Events(seen.append)
    with events.stage("convert", target="coreml") as details:
        events.step("chunk0")
        with events.stage("export"):
            pass
        details["packages"] = 2
    with pytest.raises(ValueError, match="boom"), events.stage("convert"):
        raise ValueError("boom")
    assert [(e.kind, e.name) for e in seen] == [
        ("start", "convert"),
        ("step", "convert.chunk0"),
        ("start", "convert.export"),
        ("end", "convert.export"),
        ("end", "convert"),
        ("start", "convert"),
        ("end", "convert"),
    ]
    assert seen[4].details == {"target": "coreml", "packages": 2} and seen[4].seconds >= seen[3].seconds
    timings = events.timings()
    assert list(timings) == ["convert", "convert.export"]  # a stage twice is summed; steps are not stages
    assert timings["convert"] == pytest.approx(seen[4].seconds + seen[6].seconds)


def test_compile_reports_its_stages_from_its_events():
    model, args, _ = example("mlp")
    seen = []
    compiled = anefx.compile(model, args, progress=seen.append)
    ended = [e.name for e in seen if e.kind == "end"]
    assert ended[:3] == ["capture", "passes.guard", "passes"] and "convert.ct_convert" in ended
    passes = [e.path[-1] for e in seen if e.kind == "step" and e.path[0] == "passes"]
    assert passes == anefx.Pipeline.default().names  # one step per pass: the CLI's progress bar
    timings = compiled.timings
    assert {e.name for e in seen if e.kind == "end"} <= set(timings)
    assert compiled.report.timings == timings and timings["total"] >= timings["capture"] + timings["passes"]
