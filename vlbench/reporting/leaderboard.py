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
and ``ci_high`` per cell), and in each column the best value and every value not
significantly below it (a paired test on the same samples, :mod:`vlbench.reporting.statistics`)
are in bold. A row trained with several seeds shows the mean over its seeds, and its interval
and tests cover the seeds as well as the test samples (a hierarchical bootstrap).

:func:`build_board` gathers what both pages show (the tables, each defense's section with
its claimed numbers, the notes, the provenance); ``leaderboard.html`` is rendered by
:mod:`vlbench.reporting.page` and its figures drawn by :mod:`vlbench.reporting.figures`.
Several folders merge into one board only when their :func:`protocol` agrees: the models
may differ, and every row shows its own (architecture, base model, where its weights came
from); a label that names rows on different base weights is split by base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlbench.errors import UserError
from vlbench.evaluation.tasks import PRIMARY_METRICS
from vlbench.reporting import checks, claimed, figures, statistics
from vlbench.reporting.cells import base_fingerprint, base_model
from vlbench.reporting.numbers import Number, column_leaders
from vlbench.reporting.page import html_page
from vlbench.schema import parse_claims
from vlbench.store.artifacts import without_versions
from vlbench.store.files import atomic_write_text

log = logging.getLogger(__name__)
LONG_COLUMNS = ["defense", "training_seed", "attack", "dataset", "task", "metric", "value", "ci_low", "ci_high", "n",
                "subset_hash", "seed", "cell", "created", "code_revision", "plugin_versions", "arch", "base", "weights"]


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
        model = base_model(result)
        for metric, value in result["metrics"].items():
            found = statistics.outcomes(result, metric)
            low, high = (np.nan, np.nan) if found is None else statistics.interval([found], result["cell"], metric)
            rows.append({"defense": result["defense"], "training_seed": result.get("training_seed"),
                         "attack": result["attack"],
                         "dataset": result["dataset"], "task": result["task"], "metric": metric,
                         "value": float(value), "ci_low": low, "ci_high": high,
                         "n": result["n"], "subset_hash": result["subset_hash"],
                         "seed": result.get("seed"), "cell": result["cell"], "created": result.get("created"),
                         "code_revision": result.get("code_revision"),
                         "plugin_versions": " ".join(plugin_versions(result.get("config", {}))),
                         "arch": model.get("arch"), "base": model.get("entry"), "weights": model.get("source")})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _order(values, preferred_first: str) -> list[str]:
    unique = list(dict.fromkeys(values))
    return sorted(unique, key=lambda v: (v != preferred_first, unique.index(v)))


def headline_metrics(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of each task's primary metrics; the newest result wins when a cell was
    recomputed under the same labels."""
    headline = long[long.apply(lambda r: r["metric"] in PRIMARY_METRICS.get(r["task"], ()), axis=1)]
    return headline.sort_values("created").drop_duplicates(["defense", "training_seed", "attack", "dataset", "metric"],
                                                           keep="last")


def _label(attack: str) -> str:
    return "clean" if attack == "none" else attack


def render(numbers: pd.DataFrame, bold: tuple[str, str]) -> pd.DataFrame:
    """Text of a table whose cells are lists of :class:`Number` (shown joined by " / "), the
    leaders of each column and position wrapped in ``bold``."""
    shown = pd.DataFrame(index=numbers.index, columns=numbers.columns, dtype=object)
    for column in numbers.columns:
        cells = list(numbers[column])
        marks = column_leaders(cells)
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
            if not set(labels) & set(table.columns):
                continue  # the sweep did not run on this task (e.g. a classification-only attack)
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


def _flag_rows(table: pd.DataFrame, flagged: dict[str, str]) -> pd.DataFrame:
    return table.rename(index=lambda defense: f"{defense} {flagged[defense]}" if defense in flagged else defense)


# -- several folders, provenance ------------------------------------------------------------
RUN_RECORD = "run.json"
SUBMISSION = "submission.json"


def protocol(results: list[dict]) -> dict[str, set]:
    """What must agree for two folders' cells to share a table: the seed, each dataset's
    evaluation subset, what each attack label does, and the precision. Models and weights
    may differ (each row shows its own), and so may code and library versions (the tables
    mark ‡ what code differs; the provenance lists the versions)."""
    found: dict[str, set] = {}
    for r in results:
        attack = without_versions(r.get("config", {}).get("attack", {}))
        entries = {"seed": str(r.get("seed")), f"{r['dataset']} subset": f"{r.get('subset_hash')} (n={r.get('n')})",
                   "precision": str(r.get("precision")),
                   f"attack {r['attack']}": json.dumps(attack, sort_keys=True, default=str)}
        for key, value in entries.items():
            found.setdefault(key, set()).add(value)
    return found


def check_mergeable(folders: dict[Path, list[dict]]) -> None:
    """Refuse (a :class:`UserError` naming every difference) to put folders whose cells differ
    in :func:`protocol` into one table."""
    per_folder = {folder: protocol(results) for folder, results in folders.items()}
    differences = []
    keys = list(dict.fromkeys(k for found in per_folder.values() for k in found))
    for key in keys:
        holding = {folder: found[key] for folder, found in per_folder.items() if key in found}
        if len(holding) > 1 and len({frozenset(v) for v in holding.values()}) > 1:
            differences.append(f"{key}: " + " vs ".join(f"{'/'.join(sorted(_short(x) for x in v))} in {folder}"
                                                         for folder, v in holding.items()))
    if differences:
        raise UserError("cannot merge results evaluated under different protocols — " + "; ".join(differences),
                        "rerun one folder with the other's protocol (datasets, --limit, --seed, attack settings, "
                        "precision); different models are fine")


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def row_key(result: dict) -> tuple:
    """What a row's model is: its base entry, the fingerprint its cell key names, and the
    base weights as loaded."""
    model = base_model(result)
    return model.get("entry"), model.get("weights"), base_fingerprint(result)


def distinguish_rows(results: list[dict]) -> list[dict]:
    """The results, each row label that names models of different base weights (folders
    merged, or one base rebuilt with other bits) split into ``label [base]``, so rows on
    different weights are never shown as one."""
    keys: dict[str, set] = {}
    for r in results:
        keys.setdefault(r["defense"], set()).add(row_key(r))
    split = {label for label, found in keys.items() if len(found) > 1}
    if not split:
        return results
    out = []
    for r in results:
        if r["defense"] in split:
            entry, weights, loaded = row_key(r)
            alike = sum(1 for k in keys[r["defense"]] if k[0] == entry)  # rows of this label on this entry
            tag = str(entry) if alike == 1 else f"{entry} weights {str(loaded or weights)[:12]}"
            r = {**r, "defense": f"{r['defense']} [{tag}]"}
        out.append(r)
    return out


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def provenance(folders: list[Path], results: list[dict]) -> dict[str, Any]:
    """What produced the cells: code revisions, versions, seeds, each dataset's subset, and
    the commands recorded by the runs that wrote them (``run.json``)."""
    revisions: dict[str, int] = {}
    versions: dict[str, set] = {}
    subsets: dict[str, set] = {}
    for r in results:
        revisions[str(r.get("code_revision"))] = revisions.get(str(r.get("code_revision")), 0) + 1
        for key, value in r.get("versions", {}).items():
            versions.setdefault(key, set()).add(str(value))
        config = r.get("config", {})
        subsets.setdefault(r["dataset"], set()).add(
            f"n={r.get('n')}, split {config.get('split', '?')}, subset {r.get('subset_hash')}")
    commands = [c for folder in folders for c in read_json(folder / RUN_RECORD).get("commands", [])]
    return {"folders": [str(f) for f in folders], "cells": len(results), "code revisions": revisions,
            "versions": {k: sorted(v) for k, v in sorted(versions.items())},
            "seeds": sorted({str(r.get("seed")) for r in results}),
            "models": sorted({_model(r) for r in results}),
            "subsets": {d: sorted(v) for d, v in subsets.items()}, "commands": list(dict.fromkeys(commands))}


def _model(result: dict) -> str:
    model = base_model(result)
    return f"{model.get('entry') or model.get('arch')}: {model.get('arch')}, {model.get('source')}"


def record_command(out: str | Path, argv: list[str]) -> None:
    """Add the command line that writes into ``out`` to its ``run.json``, for the page's provenance."""
    import shlex

    from vlbench.store.files import atomic_write_json, file_lock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # beside the run's claims on cells, which hold its other lock files
    with file_lock(out / "claims" / f"{RUN_RECORD}.lock", "the run record"):
        record = read_json(out / RUN_RECORD)
        commands = record.get("commands", [])
        command = "vlbench " + shlex.join(argv)
        if command not in commands:
            atomic_write_json(out / RUN_RECORD, {**record, "commands": [*commands, command]})


# -- defenses ------------------------------------------------------------------------------
@dataclass
class DefenseInfo:
    """What the page's section on one defense row shows."""

    label: str
    name: str
    version: str
    paper: str
    description: str
    params: dict
    training_data: str
    checkpoint: str
    training_seconds: float | None
    flags: list[str]
    comparisons: list
    #: the row's base model: architecture, model card entry, where its weights came from,
    #: the fingerprint of the weights as loaded
    arch: str = ""
    base: str = ""
    weights_from: str = ""
    base_fingerprint: str = ""

    def model_line(self) -> str:
        """The row's model in a few words: ``ViT-B-32 · openai-vit-b-32``."""
        return " · ".join(part for part in (self.arch, self.base) if part)


def _registered(name: str):
    from vlbench import api

    try:
        api.discover()
        return api.defenses.get(name)
    except Exception:  # an unregistered defense (e.g. a submission not installed here) has no class
        return None


def _release_claims(model: dict) -> list:
    """The claimed numbers of a row's base model entry in the model card (none for an entry
    the card does not have, e.g. a config's own)."""
    from vlbench.models.card import card

    try:
        spec = card().get(model.get("entry") or "")
    except UserError:
        return []
    return parse_claims(spec.claimed, f"model {spec.name!r}") if spec is not None else []


def _weights_from(model: dict) -> str:
    """Where a row's weights came from, through its bases: ``URL (visual) on hf-hub:...``."""
    text = str(model.get("source"))
    if model.get("towers") not in (None, "full") and isinstance(model.get("base"), dict):
        text += f" ({model['towers']} tower) on {model['base'].get('entry')}: {_weights_from(model['base'])}"
    return text


def defense_infos(results: list[dict], submissions: dict[str, dict], by_cell: dict[str, dict],
                  audit_flags: dict[str, str]) -> list[DefenseInfo]:
    infos = []
    rows_of: dict[str, list[dict]] = {}
    for r in results:
        rows_of.setdefault(r["defense"], []).append(r)
    ordered = sorted(results, key=lambda r: str(r.get("created")))  # as the tables order rows
    for label in _order([r["defense"] for r in ordered], "none"):
        mine = rows_of[label]
        config = mine[0].get("config", {}).get("defense", {})
        name = config.get("name", label)
        cls = _registered(name)
        record = submissions.get(name, {})
        params = config.get("params", {})
        claims = parse_claims(record["claimed"], f"submission record of {name}") if "claimed" in record else []
        if cls is not None:
            claims += parse_claims(list(getattr(cls, "claimed", ())), f"defense {name}")
        model = base_model(mine[0])
        as_released = any(base_fingerprint(r) is not None and r.get("model", {}).get("fingerprint") == base_fingerprint(r)
                          for r in mine)
        if as_released:  # the row evaluates its base model as it is: the release's own claims apply
            claims += _release_claims(model)
        comparisons = claimed.compare(claims, mine, lambda rows: Number.of(rows, by_cell))
        trained = [r.get("model", {}) for r in mine if r.get("model", {}).get("trained")]
        fits = [m["fit"]["seconds"] for m in trained if isinstance(m.get("fit"), dict) and "seconds" in m["fit"]]
        checkpoint = next((Path(m["checkpoint"]).stem for m in trained if m.get("checkpoint")), "")
        data = params.get("train_datasets")
        training_data = (f"{', '.join(map(str, data))} ({params.get('split', 'train')} split)" if data
                         else "none: it does not train" if not trained else "see its parameters")
        flags = [audit_flags[label]] if label in audit_flags else []
        if any(c.status == claimed.BELOW for c in comparisons):
            flags.append("⚑ " + claimed.BELOW)
        infos.append(DefenseInfo(label, name, str(config.get("version", "")),
                                 record.get("paper") or getattr(cls, "paper", "") or "not declared",
                                 record.get("description") or getattr(cls, "description", ""),
                                 {k: v for k, v in params.items() if k not in ("train_datasets", "split")},
                                 training_data, checkpoint or ("not trained" if not trained else "not recorded"),
                                 fits[0] if fits else None, flags, comparisons, str(model.get("arch") or ""),
                                 str(model.get("entry") or ""), _weights_from(model),
                                 str(base_fingerprint(mine[0]) or model.get("weights") or "")))
    return infos


# -- the board -----------------------------------------------------------------------------
@dataclass
class Board:
    """Everything the Markdown and HTML leaderboards show."""

    title: str
    summaries: list[tuple[str, pd.DataFrame]]   # (caption, table of Number lists), flagged rows renamed
    curves: list[tuple[str, str, pd.DataFrame]]  # (sweep base, caption, table)
    full: tuple[str, pd.DataFrame]
    per_dataset: list[tuple[str, pd.DataFrame]]
    families: dict[str, list[str]]               # attack family -> attack column labels
    notes: list[str]
    defenses: list[DefenseInfo]
    provenance: dict[str, Any]
    row_flags: dict[str, str]

    def models_table(self) -> pd.DataFrame:
        """Each row's model: architecture, base model entry, where its weights came from."""
        return pd.DataFrame([{"row": i.label, "defense": i.name, "architecture": i.arch, "base model": i.base or "–",
                              "weights from": i.weights_from, "base fingerprint": _fingerprint(i.base_fingerprint)}
                             for i in self.defenses]).set_index("row")

    def row_models(self) -> dict[str, str]:
        return {info.label: info.model_line() for info in self.defenses}


def _fingerprint(text: str) -> str:
    """A hash shortened to 16 digits; a key with words in it (a build's) in full."""
    return text[:16] if all(c in "0123456789abcdef" for c in text) else text


def attack_families(results: list[dict]) -> dict[str, list[str]]:
    families: dict[str, list[str]] = {}
    for r in results:
        modality = r.get("config", {}).get("attack", {}).get("threat_model", {}).get("modality")
        if modality and modality != "none" and r["attack"] != "none":
            labels = families.setdefault(modality, [])
            if r["attack"] not in labels:
                labels.append(r["attack"])
    return {f: families[f] for f in ("image", "text", "multimodal", *families) if f in families}


def build_board(folders: list[Path], results: list[dict]) -> Board:
    long = read_results(folders[0], results)
    by_cell = {result["cell"]: result for result in results}
    headline = headline_metrics(long)
    table, notes = pivot(headline, by_cell)
    notes += flags(results) + text_constraints(results)
    swept = [label for labels in sweeps(headline).values() for label in labels]
    compact_tables = summaries(headline[~headline["attack"].isin(swept)], by_cell)
    curve_tables = curves(headline, by_cell)
    marked, mixed_notes = mark_mixed([*compact_tables, *curve_tables, ("Every dataset", table, headline)])
    notes += mixed_notes
    reports = [checks.read_report(folder) for folder in folders]
    audit_flags = {d: f for folder in folders for d, f in checks.row_flags(folder).items()}
    submissions = {}
    for folder in folders:
        record = read_json(folder / SUBMISSION)
        if record.get("name"):
            submissions[str(record["name"])] = record
    infos = defense_infos(results, submissions, by_cell, audit_flags)
    row_flags = {info.label: " ".join(info.flags) for info in infos if info.flags}
    if audit_flags:
        notes.append("⚑ failed gradient-masking checks (Carlini et al. 2019 §5; `vlbench audit`, evidence in "
                     f"{checks.AUDIT_FOLDER}/{checks.REPORT}): " + "; ".join(f"{d}: {f[2:]}" for d, f in audit_flags.items()))
    below = [info.label for info in infos if any(c.status == claimed.BELOW for c in info.comparisons)]
    if below:
        notes.append(f"⚑ {claimed.BELOW}: measured below its paper's number by more than the 95 % interval "
                     "(see the defense's section): " + ", ".join(below))
    audited = [d for report in reports for d, entry in report.items() if entry.get("passed") and not entry.get("failed")]
    if audited:
        notes.append("passed every gradient-masking check the audit decided: " + ", ".join(audited))
    notes.append(interval_note(headline))
    flagged = lambda part: _flag_rows(part, row_flags) if row_flags else part  # noqa: E731
    n_compact = len(compact_tables)
    summaries_shown = [(caption, flagged(part)) for caption, part in marked[:n_compact]]
    curves_shown = [(base, caption, flagged(part)) for (base, _, _), (caption, part)
                    in zip(_curve_bases(curve_tables), marked[n_compact:-1])]
    full_caption, _ = marked[-1]
    per_dataset = []
    for dataset in dict.fromkeys(headline["dataset"]):
        part, _ = pivot(headline[headline["dataset"] == dataset], by_cell)
        part.columns = [c[len(dataset) + 1:] if c.startswith(dataset + " ") else c for c in part.columns]
        per_dataset.append((dataset, flagged(part)))
    title = ("Top-1 accuracy (%) for classification, Recall@1 (%) for retrieval; "
             "'clean' is the attack `none`, every other column is robust accuracy/recall under that attack.")
    return Board(title, summaries_shown, curves_shown, (full_caption, flagged(table)), per_dataset,
                 attack_families(results), notes, infos, provenance(folders, results), row_flags)


def interval_note(headline: pd.DataFrame) -> str:
    """What the ± and the bold marks cover: test samples, and training seeds where rows have several."""
    seeds = headline.groupby("defense", sort=False)["training_seed"].nunique()
    seeded = {label: int(n) for label, n in seeds.items() if n > 1}
    bold = (f"bold: the best value of each column and every value not significantly below it on the same samples "
            f"(p ≥ {statistics.ALPHA}; ")
    if not seeded:
        return (f"± half the {statistics.LEVEL:.0%} bootstrap interval over test samples: each row is one training "
                "(or one set of released weights), so the spread between trainings is not in it; " + bold
                + "exact McNemar for one accuracy, paired bootstrap for recall and means); cells that did not "
                "record their samples (result schema before 3) show neither")
    counts = ", ".join(f"{label} {n}" for label, n in seeded.items())
    others = [label for label in seeds.index if label not in seeded]
    return (f"± half the {statistics.LEVEL:.0%} interval of the mean over training seeds ({counts} seeds): a "
            "hierarchical bootstrap, seeds then test samples, so it covers both"
            + (f"; over test samples only for {', '.join(others)} (one set of weights)" if others else "") + "; "
            + bold + "hierarchical bootstrap where a row has several seeds, else exact McNemar for one accuracy "
            "and a paired bootstrap for recall and means)")


def _curve_bases(curve_tables: list) -> list[tuple[str, str, pd.DataFrame]]:
    """The sweep base of each of :func:`curves`' tables, in the same order."""
    return [(caption.split(" at each swept value")[0], caption, table) for caption, table, _ in curve_tables]


# -- writing -------------------------------------------------------------------------------
FIGURES = "figures"


def draw_figures(board: Board, out: Path) -> list:
    folder = out / FIGURES
    drawn = []
    defenses = list(dict.fromkeys(d for _, table in board.summaries for d in map(str, table.index)))
    by_base: dict[str, list] = {}
    for base, caption, table in board.curves:
        by_base.setdefault(base, []).append((caption.split(" — ", 1)[-1], table))
    for base, tables in by_base.items():
        drawn.append(figures.curve_figure(base, tables, defenses or [str(d) for d in tables[0][1].index], folder))
    if board.summaries:
        caption, table = board.summaries[0]
        drawn += [f for f in (figures.clean_robust_figure(caption, table, folder),
                              figures.family_bars_figure(caption, table, board.families, folder)) if f is not None]
    wanted = {f"{f.name}.png" for f in drawn}
    for stale in folder.glob("*.png") if folder.is_dir() else []:
        if stale.name not in wanted:  # a figure the results no longer give
            stale.unlink()
    return drawn


def markdown(board: Board, drawn: list) -> tuple[str, str, str]:
    """The Markdown page, and its summary and full parts (for the terminal)."""
    summary_md = "".join(f"\n**{caption}**\n\n{render(part, ('**', '**')).to_markdown()}\n"
                         for caption, part in [*board.summaries, *[(c, t) for _, c, t in board.curves]])
    full_caption, table = board.full
    full_md = f"\n**{full_caption}**\n\n{render(table, ('**', '**')).to_markdown()}\n"
    figures_md = "".join(f"\n![{f.caption}]({FIGURES}/{f.name}.png)\n" for f in drawn)
    footer = "".join(f"\n{note}\n" for note in board.notes)
    models_md = f"\n**Models**: each row's architecture, base model and weights\n\n{board.models_table().to_markdown()}\n"
    return (board.title + "\n" + summary_md + models_md + full_md + figures_md + footer, summary_md,
            full_md + footer)


def write_leaderboard(results_dirs: str | Path | list, print_markdown: bool = False,
                      out: str | Path | None = None) -> Path:
    """Write ``leaderboard.csv``, ``.md`` and ``.html`` (with its figures) for one results
    folder, into it; or for several merged (their settings must agree), into ``out``."""
    folders = [Path(d) for d in ([results_dirs] if isinstance(results_dirs, (str, Path)) else results_dirs)]
    if len(folders) > 1 and out is None:
        raise UserError("merging several results folders needs a folder for the merged leaderboard",
                        "pass --out FOLDER")
    out = Path(out) if out is not None else folders[0]
    by_folder = {}
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"results folder {folder} does not exist", "pass the --out folder of a matrix run")
        by_folder[folder] = load_results(folder)
        if not by_folder[folder]:
            raise UserError(f"no result files under {folder}", "run `vlbench run matrix` first")
    if len(folders) > 1:
        check_mergeable(by_folder)
    results = distinguish_rows(list({r["cell"]: r for rs in by_folder.values() for r in rs}.values()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "leaderboard.csv", read_results(out, results).to_csv(index=False))
    board = build_board(folders, results)
    drawn = draw_figures(board, out)
    page, summary_md, rest_md = markdown(board, drawn)
    atomic_write_text(out / "leaderboard.md", page)
    atomic_write_text(out / "leaderboard.html", html_page(board, drawn))
    if print_markdown:
        # The per-dataset table is too wide for a terminal when there are summaries.
        shown = summary_md if board.summaries else rest_md
        footer = "".join(f"\n{note}\n" for note in board.notes)
        models = board.models_table()
        if models["base model"].nunique() > 1:  # rows on several models: say which is which
            shown = f"\n**Models**\n\n{models.to_markdown()}\n" + shown
        print(board.title + "\n" + shown + (footer if board.summaries else "")
              + f"\nEvery dataset, figures and the HTML page: {out / 'leaderboard.md'}, {out / 'leaderboard.html'}")
    return out / "leaderboard.md"
