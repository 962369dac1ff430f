"""What two runs are compared by: the metrics of every cell, and the leaderboard's rows
without the columns that say when a cell was written."""

import json
import re
from pathlib import Path

import pandas as pd


def metrics_by_cell(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["metrics"] for p in sorted((Path(out) / "cells").glob("*.json"))}


def leaderboard_rows(out) -> list[dict]:
    table = pd.read_csv(Path(out) / "leaderboard.csv")
    table = table.drop(columns=[c for c in ("created",) if c in table])
    # NaN is not equal to itself: a metric without an interval must compare as the same
    return table.astype(object).where(table.notna(), None).to_dict("records")


def trainings(log: str, label: str) -> int:
    """How many times a log says a training of ``label`` started (the runner's one line each)."""
    return len(re.findall(rf"^training {re.escape(label)} \(", log, re.M))
