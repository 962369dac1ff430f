"""Progress that reads well wherever the output goes.

On a terminal, :func:`progress` is a tqdm bar. Anywhere else (a CI log, ``> file``, a SLURM
output file) a bar's carriage returns pile up into one unreadable line, so it prints plain
lines instead: at most one every few seconds (``VLBENCH_PROGRESS_SECONDS``, default 10),
showing every open bar from the outermost in (``cells: 40/175 (23%), 2m elapsed, ~6m left |
fit tecoa: 120/200 (60%) ...``), and a closing line for bars that are kept (``leave=True``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator

_last_line = [0.0]
_open: list["LineProgress"] = []


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("VLBENCH_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def clock(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LineProgress:
    """The part of tqdm's interface vlbench uses, printed as occasional whole lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                 leave: bool = True, initial: int = 0, stream=None, unit: str = ""):
        self.iterable = iterable
        #: "B": counts are bytes, shown in MB
        self.unit = unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.leave, self.n = total, desc or "", leave, initial
        self.initial = initial
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.postfix = ""
        self.closed = False
        _open.append(self)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        done = self.n - self.initial
        shown = (lambda n: f"{n / 2**20:.1f}") if self.unit == "B" else str
        parts = [f"{self.desc}: {shown(self.n)}" + (f"/{shown(self.total)}" if self.total else "")
                 + (" MB" if self.unit == "B" else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{clock(elapsed)} elapsed")
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"~{clock(elapsed / done * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - _last_line[0] >= _interval():
            _last_line[0] = now
            shown = [bar for bar in _open if not isinstance(bar, _Silent)] or [self]
            print(" | ".join(bar.line() for bar in shown), file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix(self, values: dict | None = None, **kwargs) -> None:
        items = {**(values or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave:
                self._maybe_print(force=True)
            if self in _open:
                _open.remove(self)


class _Silent(LineProgress):
    def _maybe_print(self, force: bool = False) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             enabled: bool = True, leave: bool = True, initial: int = 0, unit: str = ""):
    """A progress bar over ``iterable`` (or updated by hand up to ``total``); ``unit="B"``
    counts bytes."""
    if not enabled:
        return _Silent(iterable, total, desc, leave, initial, unit=unit)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        scaled = dict(unit="B", unit_scale=True, unit_divisor=1024) if unit == "B" else {}
        return tqdm(iterable, total=total, desc=desc, leave=leave, initial=initial, **scaled)
    return LineProgress(iterable, total, desc, leave, initial, unit=unit)
