"""Stage timing and progress, one instrument: structured events.

Every stage of a compile (``capture``, ``passes``, ``guard``, ``chunk``, ``convert`` and the target's
own sub-stages ``export``, ``check_converter_input``, ``ct_convert``, ``compress`` …) is opened with
:meth:`Events.stage`, which emits a ``start`` event, then an ``end`` event with its seconds and
details; a stage opened inside another is named by its path (``convert.ct_convert``). Inside a
stage, :meth:`Events.step` marks progress without timing a stage of its own (each pass of the
pipeline, each chunk). Listeners get every event as it happens: the CLI renders them with ``rich``;
:meth:`Events.timings` folds them into the seconds per stage that the report and the benchmark
read. Nothing else in anefx times a stage by hand.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["start", "end", "step"]


@dataclass(frozen=True)
class Event:
    """One thing that happened: a stage started or ended, or a step inside a stage."""

    kind: Kind
    path: tuple[str, ...]  #: the stage (and, for a step, the step's name last)
    seconds: float | None = None  #: an ``end`` event's duration
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``convert.ct_convert`` (the stage path joined with dots)."""
        return ".".join(self.path)

    def __str__(self) -> str:
        return self.name


Listener = Callable[[Event], None]


class Events:
    """Collects a compile's events and forwards each to the listeners as it happens."""

    def __init__(self, *listeners: Listener | None):
        self.listeners = [listener for listener in listeners if listener is not None]
        self.events: list[Event] = []
        self._stack: list[str] = []
        self._start = time.perf_counter()

    def emit(self, event: Event) -> None:
        self.events.append(event)
        for listener in self.listeners:
            listener(event)

    @contextlib.contextmanager
    def stage(self, name: str, **details) -> Iterator[dict[str, Any]]:
        """Time the block as stage ``name`` (nested under the current stage). The yielded dict is the
        stage's details: what the block adds to it travels with the ``end`` event."""
        self._stack.append(name)
        path = tuple(self._stack)
        self.emit(Event("start", path, details=dict(details)))
        t0 = time.perf_counter()
        try:
            yield details
        finally:
            self._stack.pop()
            self.emit(Event("end", path, time.perf_counter() - t0, dict(details)))

    def step(self, name: str, **details) -> None:
        """Progress inside the current stage (a pass, a chunk): no stage of its own in the timings."""
        self.emit(Event("step", (*self._stack, name), details=details))

    def record(self, name: str, seconds: float, **details) -> None:
        """A sub-stage timed by someone else (a converter that reports its own seconds)."""
        path = (*self._stack, name)
        self.emit(Event("start", path, details=dict(details)))
        self.emit(Event("end", path, seconds, dict(details)))

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start

    def timings(self) -> dict[str, float]:
        """Seconds per stage path (``capture``, ``convert``, ``convert.ct_convert`` …), summed over
        repeats, in the order the stages first started."""
        out: dict[str, float] = {}
        for e in self.events:
            if e.kind == "start":
                out.setdefault(e.name, 0.0)
            elif e.kind == "end":
                out[e.name] = out.get(e.name, 0.0) + (e.seconds or 0.0)
        return out


def events_of(events: Events | None) -> Events:
    """``events``, or a collector nobody listens to (so callers never test for None)."""
    return events if events is not None else Events()
