"""Leaderboards from result files.

``leaderboard.csv`` is the long table (one row per cell and metric: defense, attack, dataset,
task, metric, value, n, subset_hash, ...). ``leaderboard.md`` and ``leaderboard.html`` hold
compact defense × attack summaries (mean top-1 over the classification datasets, R@1 both
ways per retrieval dataset) and the full pivot of headline metrics: defenses as rows; per
dataset the clean metric and each attack's robust metric. Values come from the results only.
Where one column mixes results computed on different evaluation subsets, the column is
marked and a footnote says so, so numbers from different subsets are never silently compared;
likewise a table whose cells come from different code revisions, or from different versions
of one plugin, is marked ‡ with a footnote naming them.

Every number whose cells recorded their per-sample outcomes carries its 95 % bootstrap
interval (``80.6 ± 2.8``: the value and half the interval's width; the CSV has ``ci_low``
and ``ci_high``), and in each column the best value and every value not significantly below
it (a paired test on the same samples, :mod:`vlbench.reporting.statistics`) are in bold.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from vlbench.errors import UserError
from vlbench.evaluation.tasks import PRIMARY_METRICS
from vlbench.reporting import checks, statistics
from vlbench.store.files import atomic_write_text

log = logging.getLogger(__name__)
LONG_COLUMNS = ["defense", "attack", "dataset", "task", "metric", "value", "ci_low", "ci_high", "n", "subset_hash",
                "seed", "cell", "created", "code_revision", "plugin_versions"]


def plugin_versions(config: dict) -> list[str]:
    """``name@version`` of a cell's defense, attack and the attack's components."""
    found = []

    def visit(part):
        if isinstance(part, dict):
            if "name" in part and "version" in part:
                found.append(f"{part['name']}@{part['version']}")
            for key in ("defense", "attack", "components"):
                visit(part.get(key))
        elif isinstance(part, list):
            for item in part:
                visit(item)

    visit(config)
    return found


def load_results(results_dir: Path) -> list[dict]:
    """Every result cell under ``results_dir``, except its audit's (a results folder of its own)."""
    results = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if path.name.startswith(".") or path.relative_to(results_dir).parts[0] == checks.AUDIT_FOLDER:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("skipping unreadable result %s", path)
            continue
        if isinstance(result, dict) and "metrics" in result and "cell" in result:
            results.append(result)
    return results


def read_results(results_dir: Path, results: list[dict] | None = None) -> pd.DataFrame:
    rows = []
    for result in results if results is not None else load_results(results_dir):
        for metric, value in result["metrics"].items():
            found = statistics.outcomes(result, metric)
            low, high = (np.nan, np.nan) if found is None else statistics.interval([found], result["cell"], metric)
            rows.append({"defense": result["defense"], "attack": result["attack"],
                         "dataset": result["dataset"], "task": result["task"], "metric": metric,
                         "value": float(value), "ci_low": low, "ci_high": high,
                         "n": result["n"], "subset_hash": result["subset_hash"],
                         "seed": result.get("seed"), "cell": result["cell"], "created": result.get("created"),
                         "code_revision": result.get("code_revision"),
                         "plugin_versions": " ".join(plugin_versions(result.get("config", {})))})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _order(values, preferred_first: str) -> list[str]:
    unique = list(dict.fromkeys(values))
    return sorted(unique, key=lambda v: (v != preferred_first, unique.index(v)))


def headline_metrics(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of each task's primary metrics; the newest result wins when a cell was
    recomputed under the same labels."""
    headline = long[long.apply(lambda r: r["metric"] in PRIMARY_METRICS.get(r["task"], ()), axis=1)]
    return headline.sort_values("created").drop_duplicates(["defense", "attack", "dataset", "metric"], keep="last")


def _label(attack: str) -> str:
    return "clean" if attack == "none" else attack


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


def render(numbers: pd.DataFrame, bold: tuple[str, str]) -> pd.DataFrame:
    """Text of a table whose cells are lists of :class:`Number` (shown joined by " / "), the
    leaders of each column and position wrapped in ``bold``."""
    shown = pd.DataFrame(index=numbers.index, columns=numbers.columns, dtype=object)
    for column in numbers.columns:
        cells = list(numbers[column])
        width = max((len(c) for c in cells if isinstance(c, list)), default=0)
        marks = [leaders([c[k] if isinstance(c, list) else None for c in cells]) for k in range(width)]
        for row, cell in enumerate(cells):
            if not isinstance(cell, list):
                shown.iloc[row, shown.columns.get_loc(column)] = "–"
                continue
            parts = [bold[0] + n.text() + bold[1] if row in marks[k] else n.text() for k, n in enumerate(cell)]
            shown.iloc[row, shown.columns.get_loc(column)] = " / ".join(parts)
    return shown


def pivot(headline: pd.DataFrame, by_cell: dict[str, dict]) -> tuple[pd.DataFrame, list[str]]:
    """Defenses × (dataset, attack, metric) of the headline metrics, as :class:`Number` lists; and footnotes."""
    notes = []
    defenses = _order(headline["defense"], "none")
    attacks = _order(headline["attack"], "none")
    table = pd.DataFrame(index=defenses)
    mixed = set()
    for dataset in dict.fromkeys(headline["dataset"]):
        rows = headline[headline["dataset"] == dataset]
        if rows["subset_hash"].nunique() > 1:
            mixed.add(dataset)
        for attack in attacks:
            for metric in PRIMARY_METRICS[rows["task"].iloc[0]]:
                cells = rows[(rows["attack"] == attack) & (rows["metric"] == metric)]
                if cells.empty:
                    continue
                suffix = "" if metric == "top1" else f" {metric}"
                column = f"{dataset}{suffix} {_label(attack)}" + (" †" if dataset in mixed else "")
                table[column] = _numbers(cells, lambda part: [Number.of(part, by_cell)]).reindex(defenses)
    if mixed:
        notes.append(f"† results in this column come from different evaluation subsets "
                     f"({', '.join(sorted(mixed))}); rerun them on one subset before comparing")
    table.index.name = "defense"
    return table, notes


def _numbers(rows: pd.DataFrame, build) -> pd.Series:
    """``build(rows of one defense)`` per defense, as an object column."""
    return pd.Series({defense: build(part) for defense, part in rows.groupby("defense", sort=False)}, dtype=object)


def mixed_code(rows: pd.DataFrame) -> str | None:
    """What differs in the code behind ``rows``: code revisions, or one plugin's versions."""
    parts = []
    revisions = sorted({str(r) for r in rows["code_revision"].dropna()})
    if len(revisions) > 1:
        parts.append("code revisions " + ", ".join(revisions))
    versions: dict[str, set[str]] = {}
    for entry in " ".join(rows["plugin_versions"].fillna("")).split():
        name, _, version = entry.rpartition("@")
        versions.setdefault(name, set()).add(version)
    parts += [f"{name} versions {', '.join(sorted(v))}" for name, v in sorted(versions.items()) if len(v) > 1]
    return "; ".join(parts) or None


def mark_mixed(tables: list[tuple[str, pd.DataFrame, pd.DataFrame]]) -> tuple[list[tuple[str, pd.DataFrame]], list[str]]:
    """Mark ‡ each ``(caption, table, rows behind it)`` whose rows come from mixed code."""
    marked, notes = [], []
    for caption, table, rows in tables:
        mixed = mixed_code(rows)
        if mixed:
            notes.append(f"‡ {caption}: its cells come from different code ({mixed}); "
                         "rerun the older ones before comparing")
        marked.append((caption + " ‡" if mixed else caption, table))
    return marked, notes


def summaries(headline: pd.DataFrame, by_cell: dict[str, dict]) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """``(caption, table, rows)`` of compact defense × attack tables (cells: :class:`Number`
    lists): mean top-1 over the classification datasets (only for defenses and attacks that
    ran on all of them), and each retrieval dataset's R@1 as "image→text / text→image"."""
    defenses = _order(headline["defense"], "none")
    attacks = _order(headline["attack"], "none")
    tables = []
    classification = headline[headline["task"] == "classification"]
    n_datasets = classification["dataset"].nunique()
    if n_datasets > 1:
        table = pd.DataFrame(index=defenses)
        for attack in attacks:
            rows = classification[classification["attack"] == attack]
            if rows.empty:
                continue
            complete = rows.groupby("defense")["dataset"].nunique() == n_datasets
            rows = rows[rows["defense"].map(complete)]
            if not rows.empty:
                table[_label(attack)] = _numbers(rows, lambda part: [Number.of(part, by_cell)]).reindex(defenses)
        table.index.name = "defense"
        tables.append((f"Mean top-1 (%) over the {n_datasets} classification datasets", table, classification))
    retrieval = headline[headline["task"] == "retrieval"]
    for dataset in dict.fromkeys(retrieval["dataset"]):
        rows = retrieval[retrieval["dataset"] == dataset]
        table = pd.DataFrame(index=defenses)
        for attack in attacks:
            cells = rows[rows["attack"] == attack]
            both = cells.groupby("defense")["metric"].agg(lambda m: {"i2t_R@1", "t2i_R@1"} <= set(m))
            cells = cells[cells["defense"].map(both)]
            if not cells.empty:
                table[_label(attack)] = _numbers(cells, lambda part: [
                    Number.of(part[part["metric"] == metric], by_cell) for metric in ("i2t_R@1", "t2i_R@1")
                ]).reindex(defenses)
        table.index.name = "defense"
        tables.append((f"{dataset}: R@1 (%) image→text / text→image", table, rows))
    return tables


def sweeps(headline: pd.DataFrame) -> dict[str, list[str]]:
    """The sweeps among the attack labels: ``{"pgd": ["pgd@1", "pgd@2", ...]}`` for labels
    ``base@value`` (see ``PluginSpec.sweep``), in order of value."""
    found: dict[str, list[str]] = {}
    for label in dict.fromkeys(headline["attack"]):
        base, at, value = str(label).partition("@")
        if at and "=" not in value:
            found.setdefault(base, []).append(label)

    def order(label: str):
        value = label.partition("@")[2]
        try:
            return 0, float(value), value
        except ValueError:
            return 1, 0.0, value
    return {base: sorted(labels, key=order) for base, labels in found.items() if len(labels) > 1}


def curves(headline: pd.DataFrame, by_cell: dict[str, dict]) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Each sweep's robustness curves: the compact tables of :func:`summaries` with one
    column per swept value (and clean first)."""
    tables = []
    for base, labels in sweeps(headline).items():
        rows = headline[headline["attack"].isin(["none", *labels])]
        for caption, table, behind in summaries(rows, by_cell):
            table = table[[c for c in ["clean", *labels] if c in table.columns]]
            table.columns = [c if c == "clean" else c.partition("@")[2] for c in table.columns]
            tables.append((f"{base} at each swept value — {caption}", table, behind))
    return tables


def _attack_identity(config: dict) -> tuple:
    return config.get("name"), json.dumps(config.get("params", {}), sort_keys=True)


def flags(results: list[dict]) -> list[str]:
    """Run-level warnings: cells with warnings, and point-wise worst-case ensembles (attacks
    whose config sets ``worst_case_over_components``, e.g. AutoAttack) that ended above one of
    their own components run alone on the same defense and dataset — the stronger attack doing
    worse, as AutoAttack's checks flag. Sequential compositions (a text stage, then an image
    stage) promise no such ordering and are not checked."""
    notes = []
    warned = [r for r in results if r.get("warnings")]
    if warned:
        cells = ", ".join(sorted(r["cell"] for r in warned)[:5]) + (" …" if len(warned) > 5 else "")
        notes.append(f"⚠ {len(warned)} cell(s) carry warnings (see their result files): {cells}")
    by_identity = {}
    for r in results:
        attack = r.get("config", {}).get("attack", {})
        by_identity[(r["defense"], r["dataset"], _attack_identity(attack))] = r
    for r in results:
        attack = r.get("config", {}).get("attack", {})
        if not attack.get("worst_case_over_components"):
            continue
        for component in attack.get("components", []):
            alone = by_identity.get((r["defense"], r["dataset"], _attack_identity(component)))
            if alone is None:
                continue
            for metric in PRIMARY_METRICS.get(r["task"], ()):
                mine, theirs = r["metrics"].get(metric), alone["metrics"].get(metric)
                if mine is not None and theirs is not None and mine > theirs + 1e-6 and r["n"] == alone["n"]:
                    notes.append(f"⚠ {r['attack']} ({mine:.1f}) is above its component {alone['attack']} "
                                 f"({theirs:.1f}) on {r['defense']} × {r['dataset']} {metric}: the stronger attack "
                                 "did worse; check the attack")
    return notes


def text_constraints(results: list[dict]) -> list[str]:
    """What the text and multimodal columns' edits had to keep: per attack label, the share
    of candidate edits its cells rejected for changing what the text states (the counts
    ``edits_rejected`` / ``edits_considered`` of constrained attacks), and which labels
    scored every edit (unconstrained: the papers' protocol)."""
    counted: dict[str, list[int]] = {}
    free = set()
    for r in results:
        metrics = r.get("metrics", {})
        if "edits_considered" in metrics:
            total = counted.setdefault(r["attack"], [0, 0])
            total[0] += int(metrics.get("edits_rejected", 0))
            total[1] += int(metrics["edits_considered"])
        elif r.get("config", {}).get("attack", {}).get("threat_model", {}).get("modality") in ("text", "multimodal"):
            free.add(r["attack"])
    notes = []
    if counted:
        shares = ", ".join(f"{label} {100 * rejected / max(considered, 1):.0f}% of {considered:,}"
                           for label, (rejected, considered) in sorted(counted.items()))
        notes.append("text edits kept to the meaning (the dataset's parser reads the same attributes from the edited "
                     f"text); candidate edits rejected for changing it: {shares}")
    if free:
        notes.append("unconstrained text edits (every candidate scored, the papers' protocol): "
                     + ", ".join(sorted(free - set(counted))))
    return [note for note in notes if not note.endswith(": ")]


def _escape(text) -> str:
    return html.escape(str(text), quote=False)


def _html_table(numbers: pd.DataFrame) -> str:
    # labels come from configs and result files: text, never markup; only the marks are tags
    shown = render(numbers, ("<strong>", "</strong>"))
    shown.index = [_escape(label) for label in shown.index]
    shown.index.name = _escape(numbers.index.name or "")
    shown.columns = [_escape(label) for label in shown.columns]
    return shown.to_html(escape=False, na_rep="–")


def _flag_rows(table: pd.DataFrame, flagged: dict[str, str]) -> pd.DataFrame:
    return table.rename(index=lambda defense: f"{defense} {flagged[defense]}" if defense in flagged else defense)


def write_leaderboard(results_dir: str | Path, print_markdown: bool = False) -> Path:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist",
                        "pass the --out folder of a matrix run")
    results = load_results(results_dir)
    long = read_results(results_dir, results)
    if long.empty:
        raise UserError(f"no result files under {results_dir}", "run `vlbench run matrix` first")
    atomic_write_text(results_dir / "leaderboard.csv", long.to_csv(index=False))
    by_cell = {result["cell"]: result for result in results}
    headline = headline_metrics(long)
    table, notes = pivot(headline, by_cell)
    notes += flags(results) + text_constraints(results)
    swept = [label for labels in sweeps(headline).values() for label in labels]
    compact_tables = [*summaries(headline[~headline["attack"].isin(swept)], by_cell), *curves(headline, by_cell)]
    marked, mixed_notes = mark_mixed([*compact_tables, ("Every dataset", table, headline)])
    compact, (full_caption, _) = marked[:-1], marked[-1]
    notes += mixed_notes
    flagged = checks.row_flags(results_dir)
    if flagged:
        notes.append("⚑ failed gradient-masking checks (Carlini et al. 2019 §5; `vlbench audit`, evidence in "
                     f"{checks.AUDIT_FOLDER}/{checks.REPORT}): " + "; ".join(f"{d}: {f[2:]}" for d, f in flagged.items()))
        compact = [(caption, _flag_rows(part, flagged)) for caption, part in compact]
        table = _flag_rows(table, flagged)
    audited = [d for d, entry in checks.read_report(results_dir).items() if entry.get("passed") and not entry.get("failed")]
    if audited:
        notes.append("passed every gradient-masking check the audit decided: " + ", ".join(audited))
    notes.append(f"± half the {statistics.LEVEL:.0%} bootstrap interval over samples; bold: the best value of each "
                 "column and every value not significantly below it on the same samples (exact McNemar for one "
                 f"accuracy, paired bootstrap for recall and means; p ≥ {statistics.ALPHA}); cells that did not "
                 "record their samples (result schema before 3) show neither")
    footer = "".join(f"\n{note}\n" for note in notes)
    title = ("Top-1 accuracy (%) for classification, Recall@1 (%) for retrieval; "
             "'clean' is the attack `none`, every other column is robust accuracy/recall under that attack.\n")
    summary_md = "".join(f"\n**{caption}**\n\n{render(part, ('**', '**')).to_markdown()}\n" for caption, part in compact)
    full_md = f"\n**{full_caption}**\n\n{render(table, ('**', '**')).to_markdown()}\n"
    atomic_write_text(results_dir / "leaderboard.md", title + summary_md + full_md + footer)
    atomic_write_text(results_dir / "leaderboard.html",
                      "<!doctype html><meta charset='utf-8'><title>vlbench leaderboard</title>\n"
                      f"<p>{_escape(title.strip())}</p>\n"
                      + "\n".join(f"<h3>{_escape(caption)}</h3>\n" + _html_table(part)
                                  for caption, part in [*compact, (full_caption, table)]) + "\n"
                      + "".join(f"<p>{_escape(n)}</p>" for n in notes))
    if print_markdown:
        # The per-dataset table is too wide for a terminal when there are summaries.
        shown = summary_md if compact else full_md
        print(title + shown + footer + f"\nEvery dataset: {results_dir / 'leaderboard.md'}")
    return results_dir / "leaderboard.md"
