"""``vlbench compare OUT --defenses a,b``: two defenses' paired differences, with intervals
and p-values, for every attack and dataset they both ran on the same samples, and for the
mean over the classification datasets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlbench.errors import UserError
from vlbench.reporting import statistics
from vlbench.reporting.leaderboard import Number, _label, _order, headline_metrics, load_results, read_results

MEAN = "mean over classification"


def compare(results_dir: str | Path, first: str, second: str) -> pd.DataFrame:
    """One row per (attack, dataset, metric): both values, ``first − second`` with its 95 %
    interval, the p-value and the test that gave it."""
    results = load_results(Path(results_dir))
    if not results:
        raise UserError(f"no result files under {results_dir}", "run `vlbench run matrix` first")
    headline = headline_metrics(read_results(Path(results_dir), results))
    known = list(dict.fromkeys(headline["defense"]))
    for name in (first, second):
        if name not in known:
            raise UserError(f"no defense {name!r} in {results_dir}", f"use one of {', '.join(known)}")
    by_cell = {result["cell"]: result for result in results}
    both = headline[headline["defense"].isin([first, second])]
    groups = [(f"{_label(a)}", d, m, part) for (a, d, m), part in both.groupby(["attack", "dataset", "metric"], sort=False)]
    classification = both[both["task"] == "classification"]
    for attack, part in classification.groupby("attack", sort=False):
        if part.groupby("defense")["dataset"].nunique().reindex([first, second]).eq(
                classification["dataset"].nunique()).all() and classification["dataset"].nunique() > 1:
            groups.append((_label(attack), MEAN, "top1", part))
    rows = []
    for attack, dataset, metric, part in groups:
        mine, theirs = (part[part["defense"] == name] for name in (first, second))
        if mine.empty or theirs.empty:
            continue
        a, b = Number.of(mine, by_cell), Number.of(theirs, by_cell)
        row = {"attack": attack, "dataset": dataset, "metric": metric, first: round(a.value, 1),
               second: round(b.value, 1)}
        if a.runs is None or b.runs is None or a.ids != b.ids:
            rows.append({**row, "difference": round(a.value - b.value, 1), "95% interval": "–", "p": None,
                         "test": "not on the same recorded samples"})
            continue
        d = a.difference(b)
        rows.append({**row, "difference": round(d.value, 1), "95% interval": f"[{d.low:+.1f}, {d.high:+.1f}]",
                     "p": d.p, "test": d.test + (" *" if d.p < statistics.ALPHA else "")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    rank = {_label(a): i for i, a in enumerate(_order(headline["attack"], "none"))}
    key = table.apply(lambda r: (rank[r["attack"]], r["dataset"] == MEAN, r["dataset"], r["metric"]), axis=1)
    return table.loc[key.sort_values().index].reset_index(drop=True)


def format_comparison(table: pd.DataFrame, first: str, second: str) -> str:
    if table.empty:
        return f"{first} and {second} share no attack and dataset"
    shown = table.assign(p=table["p"].map(lambda p: "–" if pd.isna(p) else f"{p:.3g}"))
    return (f"{first} − {second}, in points (* p < {statistics.ALPHA})\n\n"
            + shown.to_markdown(index=False, floatfmt=".1f", disable_numparse=True))
