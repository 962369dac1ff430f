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
    """One shown number: a metric of one cell, or its mean over several datasets' cells, and
    over training seeds where the row has several, with the per-sample outcomes behind it
    (per seed, one array per dataset) when the cells recorded them."""

    value: float
    metric: str
    cells: tuple[str, ...]
    runs: list[list[np.ndarray]] | None
    ids: tuple | None  # what names the queries: numbers pair only on the same ones
    exact: bool        # one dataset's accuracy of one training: exact McNemar; else a bootstrap

    @classmethod
    def of(cls, rows: pd.DataFrame, by_cell: dict[str, dict]) -> "Number":
        """The mean of ``rows`` (one metric, one cell per dataset and training seed)."""
        rows = rows.sort_values("dataset")  # so that two rows' groups pair dataset by dataset
        seeds = (rows["training_seed"] if "training_seed" in rows else pd.Series(np.nan, index=rows.index)).fillna(-1)
        runs: list[list[np.ndarray]] | None = []
        ids = None
        for _, part in rows.groupby(seeds, sort=True):
            groups, names = [], []
            for cell, metric, dataset in zip(part["cell"], part["metric"], part["dataset"]):
                found = statistics.outcomes(by_cell[cell], metric)
                if found is None:
                    break
                groups.append(found)
                names.append((dataset, *statistics.query_ids(by_cell[cell], metric)))
            else:
                if ids is None or ids == tuple(names):
                    ids = tuple(names)
                    runs.append(groups)
                    continue
            runs = None  # a seed without recorded outcomes, or on other queries: no interval
            break
        metric = rows["metric"].iloc[0]
        value = float(rows.groupby(seeds)["value"].mean().mean())
        return cls(value, metric, tuple(rows["cell"]), runs, None if runs is None else ids,
                   exact=rows["dataset"].nunique() == 1 and metric.endswith("top1"))

    @cached_property
    def half_width(self) -> float | None:
        if self.runs is None:
            return None
        low, high = statistics.seeded_interval(self.runs, *self.cells, self.metric)
        return (high - low) / 2

    def text(self) -> str:
        return f"{self.value:.1f}" if self.half_width is None else f"{self.value:.1f} ± {self.half_width:.1f}"

    def difference(self, other: "Number") -> statistics.Difference:
        """``self − other`` on the same queries (both must have ``runs`` and equal ``ids``)."""
        return statistics.seeded_difference(self.runs, other.runs, *self.cells, *other.cells, self.metric,
                                            exact=self.exact and other.exact)


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
        elif top.runs is not None and other.runs is not None and other.ids == top.ids and \
                top.difference(other).p >= statistics.ALPHA:
            marked.add(i)
    return marked


def column_leaders(cells: list) -> list[set[int]]:
    """For a column whose cells are lists of :class:`Number` (or not a list: no result), the
    rows to mark at each position of the lists (R@1 both ways: two positions)."""
    width = max((len(c) for c in cells if isinstance(c, list)), default=0)
    return [leaders([c[k] if isinstance(c, list) else None for c in cells]) for k in range(width)]
