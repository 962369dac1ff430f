"""A shown number with its per-sample outcomes, and which numbers of a column to mark: the
best and every one not significantly below it on the same samples."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from vlbench.reporting import statistics


@dataclass
class Number:
    """One shown number: a metric of one cell, or its mean over several datasets' cells, with
    the per-sample outcomes behind it (one array per dataset) when the cells recorded them."""

    value: float
    metric: str
    cells: tuple[str, ...]
    groups: list[np.ndarray] | None
    ids: tuple | None  # what names the queries: numbers pair only on the same ones
    exact: bool        # one dataset's accuracy: exact McNemar; else a paired bootstrap

    @classmethod
    def of(cls, rows: pd.DataFrame, by_cell: dict[str, dict]) -> "Number":
        """The mean of ``rows`` (one metric, one cell per dataset)."""
        rows = rows.sort_values("dataset")  # so that two rows' groups pair dataset by dataset
        groups, ids = [], []
        for cell, metric, dataset in zip(rows["cell"], rows["metric"], rows["dataset"]):
            found = statistics.outcomes(by_cell[cell], metric)
            if found is None:
                groups = None
                break
            groups.append(found)
            ids.append((dataset, *statistics.query_ids(by_cell[cell], metric)))
        metric = rows["metric"].iloc[0]
        return cls(float(rows["value"].mean()), metric, tuple(rows["cell"]), groups,
                   None if groups is None else tuple(ids), exact=len(rows) == 1 and metric.endswith("top1"))

    @cached_property
    def half_width(self) -> float | None:
        if self.groups is None:
            return None
        low, high = statistics.interval(self.groups, *self.cells, self.metric)
        return (high - low) / 2

    def text(self) -> str:
        return f"{self.value:.1f}" if self.half_width is None else f"{self.value:.1f} ± {self.half_width:.1f}"


def leaders(column: list["Number | None"]) -> set[int]:
    """The rows of ``column`` to mark: the best value and every value not significantly below
    it on the same samples (p ≥ ALPHA)."""
    present = [i for i, number in enumerate(column) if number is not None]
    if not present:
        return set()
    best = max(present, key=lambda i: column[i].value)
    top = column[best]
    marked = {best}
    for i in present:
        other = column[i]
        if other.value == top.value:
            marked.add(i)
        elif top.groups is not None and other.groups is not None and other.ids == top.ids and \
                statistics.paired_difference(top.groups, other.groups, *top.cells, *other.cells, top.metric,
                                             exact=top.exact).p >= statistics.ALPHA:
            marked.add(i)
    return marked


def column_leaders(cells: list) -> list[set[int]]:
    """For a column whose cells are lists of :class:`Number` (or not a list: no result), the
    rows to mark at each position of the lists (R@1 both ways: two positions)."""
    width = max((len(c) for c in cells if isinstance(c, list)), default=0)
    return [leaders([c[k] if isinstance(c, list) else None for c in cells]) for k in range(width)]
