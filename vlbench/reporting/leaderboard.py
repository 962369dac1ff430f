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
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import pandas as pd

from vlbench.errors import UserError
from vlbench.evaluation.tasks import PRIMARY_METRICS
from vlbench.store.files import atomic_write_text

log = logging.getLogger(__name__)
LONG_COLUMNS = ["defense", "attack", "dataset", "task", "metric", "value", "n", "subset_hash",
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
    results = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if path.name.startswith("."):
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
            rows.append({"defense": result["defense"], "attack": result["attack"],
                         "dataset": result["dataset"], "task": result["task"], "metric": metric,
                         "value": float(value), "n": result["n"], "subset_hash": result["subset_hash"],
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


def pivot(headline: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Defenses × (dataset, attack, metric) of the headline metrics; and footnotes."""
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
                table[column] = cells.set_index("defense")["value"].reindex(defenses)
    if mixed:
        notes.append(f"† results in this column come from different evaluation subsets "
                     f"({', '.join(sorted(mixed))}); rerun them on one subset before comparing")
    table.index.name = "defense"
    return table, notes


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


def summaries(headline: pd.DataFrame) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """``(caption, table, rows)`` of compact defense × attack tables: mean top-1 over the classification datasets (only
    for defenses and attacks that ran on all of them), and each retrieval dataset's R@1 as
    "image→text / text→image"."""
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
            means = rows.groupby("defense")["value"].mean()
            table[_label(attack)] = means.where(complete).reindex(defenses)
        table.index.name = "defense"
        tables.append((f"Mean top-1 (%) over the {n_datasets} classification datasets", table, classification))
    retrieval = headline[headline["task"] == "retrieval"]
    for dataset in dict.fromkeys(retrieval["dataset"]):
        rows = retrieval[retrieval["dataset"] == dataset]
        table = pd.DataFrame(index=defenses)
        for attack in attacks:
            cells = rows[rows["attack"] == attack].pivot(index="defense", columns="metric", values="value")
            if {"i2t_R@1", "t2i_R@1"} <= set(cells.columns):
                both = cells["i2t_R@1"].map("{:.1f}".format) + " / " + cells["t2i_R@1"].map("{:.1f}".format)
                table[_label(attack)] = both.reindex(defenses)
        table.index.name = "defense"
        tables.append((f"{dataset}: R@1 (%) image→text / text→image", table.fillna("–"), rows))
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
    headline = headline_metrics(long)
    table, notes = pivot(headline)
    notes += flags(results)
    marked, mixed_notes = mark_mixed([*summaries(headline), ("Every dataset", table, headline)])
    compact, (full_caption, _) = marked[:-1], marked[-1]
    notes += mixed_notes
    footer = "".join(f"\n{note}\n" for note in notes)
    title = ("Top-1 accuracy (%) for classification, Recall@1 (%) for retrieval; "
             "'clean' is the attack `none`, every other column is robust accuracy/recall under that attack.\n")
    summary_md = "".join(f"\n**{caption}**\n\n{part.to_markdown(floatfmt='.1f')}\n" for caption, part in compact)
    full_md = f"\n**{full_caption}**\n\n{table.to_markdown(floatfmt='.1f')}\n"
    atomic_write_text(results_dir / "leaderboard.md", title + summary_md + full_md + footer)
    # labels and notes come from configs and result files: text, never markup
    html_parts = [f"<h3>{html.escape(caption, quote=False)}</h3>\n"
                  + part.to_html(float_format=lambda v: f"{v:.1f}", na_rep="–", escape=True)
                  for caption, part in [*compact, (full_caption, table)]]
    atomic_write_text(results_dir / "leaderboard.html",
                      "<!doctype html><meta charset='utf-8'><title>vlbench leaderboard</title>\n"
                      f"<p>{html.escape(title.strip(), quote=False)}</p>\n" + "\n".join(html_parts) + "\n"
                      + "".join(f"<p>{html.escape(n, quote=False)}</p>" for n in notes))
    if print_markdown:
        # The per-dataset table is too wide for a terminal when there are summaries.
        shown = summary_md if compact else full_md
        print(title + shown + footer + f"\nEvery dataset: {results_dir / 'leaderboard.md'}")
    return results_dir / "leaderboard.md"
