"""Wall time by phase, for the summary a run prints at its end.

Whatever builds or computes something a user waits for (pretraining the world CLIP,
training the world MLM, fitting a defense, evaluating a cell) wraps it in :func:`phase`;
the runner collects the records with :func:`take` and prints :func:`summary`. Phases that
found their result in a cache record nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

_records: list[tuple[str, float]] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        _records.append((name, time.perf_counter() - started))


def record(name: str, seconds: float) -> None:
    _records.append((name, seconds))


def take() -> list[tuple[str, float]]:
    """The records since the last call, oldest first; clears them."""
    taken = list(_records)
    _records.clear()
    return taken


def summary(records: list[tuple[str, float]], total: float | None = None) -> str:
    """A table of seconds per phase name (repeated names summed), in first-seen order."""
    from vlbench.monitor.progress import clock

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, seconds in records:
        totals[name] = totals.get(name, 0.0) + seconds
        counts[name] = counts.get(name, 0) + 1
    width = max((len(name) for name in totals), default=5)
    lines = [f"  {name:<{width}}  {clock(seconds):>7}" + (f"  ({counts[name]}×)" if counts[name] > 1 else "")
             for name, seconds in totals.items()]
    if total is not None:
        lines.append(f"  {'total':<{width}}  {clock(total):>7}")
    return "\n".join(lines)
