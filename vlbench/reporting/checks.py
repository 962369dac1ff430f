"""Gradient-masking checks on result cells, and the flags they put on leaderboard rows.

The checks are those of Carlini et al., "On Evaluating Adversarial Robustness" (arXiv
1902.06705, 2019), §5, and Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False
Sense of Security" (ICML 2018), §3, that can be decided from numbers alone: accuracy near
zero at a large budget, accuracy that does not rise with the budget or with more
iterations, a black-box attack and a transferred one that are not stronger than the
white-box attack. Each check is one of three kinds over attack labels (see
``configs/audit.yaml``):

- ``at-most``: every listed attack leaves the headline metric at or below ``at_most``;
- ``non-increasing``: no attack leaves it significantly above the one listed before it;
- ``not-stronger``: the second attack does not leave it significantly below the first.

"Significantly" is the exact McNemar test on the same samples at p < 0.05
(:mod:`vlbench.reporting.statistics`), so a check fails on evidence, not on sampling noise.
A check is decided per defense over every dataset and headline metric it has cells for;
it fails if it fails on any of them. The report, ``<results>/audit/checks.json``, is read
back by the leaderboard, which marks the rows of defenses that failed a check with the
checks' names, as RobustBench and AutoAttack's ``checks.py`` report theirs beside the numbers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlbench.errors import UserError
from vlbench.evaluation.tasks import PRIMARY_METRICS
from vlbench.reporting import statistics
from vlbench.store.files import atomic_write_text

KINDS = ("at-most", "non-increasing", "not-stronger")
#: the subfolder of a results folder that holds its audit's cells and report
AUDIT_FOLDER = "audit"
REPORT = "checks.json"


@dataclass
class Check:
    """One check: its name, its kind and the attack labels it compares."""

    name: str
    kind: str
    attacks: list[str]
    at_most: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "Check":
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise UserError(f"{source}: cannot read check {raw!r}",
                            "write {name: ..., kind: at-most|non-increasing|not-stronger, attacks: [...]}")
        name = raw["name"]
        unknown = set(raw) - {"name", "kind", "attacks", "at_most"}
        if unknown:
            raise UserError(f"{source}: check {name!r} has unknown keys {sorted(unknown)}",
                            "use name, kind, attacks and (for at-most) at_most")
        kind, attacks = raw.get("kind"), raw.get("attacks")
        if kind not in KINDS:
            raise UserError(f"{source}: check {name!r} has kind {kind!r}", f"use one of {', '.join(KINDS)}")
        if not isinstance(attacks, list) or not all(isinstance(a, str) for a in attacks):
            raise UserError(f"{source}: check {name!r} needs a list of attack labels", "write attacks: [a, b]")
        wanted = {"at-most": 1, "non-increasing": 2, "not-stronger": 2}[kind]
        if len(attacks) < wanted or (kind == "not-stronger" and len(attacks) != 2):
            raise UserError(f"{source}: check {name!r} ({kind}) lists {len(attacks)} attacks",
                            "list two for not-stronger (the reference first), at least two for non-increasing")
        at_most = raw.get("at_most")
        if kind == "at-most" and not isinstance(at_most, (int, float)):
            raise UserError(f"{source}: check {name!r} (at-most) has no number at_most", "write e.g. at_most: 5")
        return cls(name, kind, list(attacks), None if at_most is None else float(at_most))


@dataclass
class Finding:
    """A check on one defense, dataset and metric."""

    check: str
    dataset: str
    metric: str
    passed: bool
    detail: str
    values: dict[str, float] = field(default_factory=dict)
    p: float | None = None


def _significant(first: dict, second: dict, metric: str) -> tuple[float | None, str | None]:
    """The McNemar p-value of two cells' outcomes, or why they cannot be paired."""
    a, b = statistics.outcomes(first, metric), statistics.outcomes(second, metric)
    if a is None or b is None:
        return None, "no per-sample outcomes"
    if statistics.query_ids(first, metric) != statistics.query_ids(second, metric):
        return None, "different samples"
    return statistics.mcnemar_exact(a, b), None


def _decide(check: Check, cells: dict[str, dict], dataset: str, metric: str) -> Finding | None:
    present = [label for label in check.attacks if label in cells and metric in cells[label]["metrics"]]
    if len(present) < len(check.attacks):
        return None
    values = {label: float(cells[label]["metrics"][metric]) for label in present}

    def finding(passed: bool, detail: str, p: float | None = None) -> Finding:
        return Finding(check.name, dataset, metric, passed, detail, values, p)

    if check.kind == "at-most":
        above = [f"{label} {values[label]:.1f}" for label in present if values[label] > check.at_most + 1e-9]
        return finding(not above, (f"above {check.at_most:g}: " + ", ".join(above)) if above
                       else f"all at or below {check.at_most:g}")
    pairs = (list(zip(present, present[1:])) if check.kind == "non-increasing" else [tuple(present)])
    worst = None
    for earlier, later in pairs:
        p, _ = _significant(cells[earlier], cells[later], metric)
        if p is None:
            return None  # undecided: the cells cannot be paired
        rises = values[later] > values[earlier] if check.kind == "non-increasing" else values[later] < values[earlier]
        if rises and p < statistics.ALPHA and (worst is None or p < worst[0]):
            worst = (p, earlier, later)
    if worst is None:
        return finding(True, "no significant " + ("rise" if check.kind == "non-increasing" else "gain"))
    p, earlier, later = worst
    verb = "above" if check.kind == "non-increasing" else "below"
    return finding(False, f"{later} {values[later]:.1f} is {verb} {earlier} {values[earlier]:.1f} (McNemar p={p:.2g})", p)


def run_checks(results: list[dict], checks: list[Check]) -> dict[str, Any]:
    """Every check on every defense of ``results``: ``{defense: {"failed": [...], "passed":
    [...], "undecided": [...], "findings": [...]}}`` (a check is undecided when its cells are
    missing for every dataset)."""
    cells: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for result in results:
        cells[(result["defense"], result["dataset"])][result["attack"]] = result
    report: dict[str, Any] = {}
    for defense in sorted({d for d, _ in cells}):
        findings = []
        for check in checks:
            for (d, dataset), by_attack in sorted(cells.items()):
                if d != defense or not by_attack:
                    continue
                task = next(iter(by_attack.values()))["task"]
                for metric in PRIMARY_METRICS.get(task, ()):
                    found = _decide(check, by_attack, dataset, metric)
                    if found is not None:
                        findings.append(found)
        decided = {f.check for f in findings}
        failed = [c.name for c in checks if any(f.check == c.name and not f.passed for f in findings)]
        report[defense] = {"failed": failed,
                           "passed": [c.name for c in checks if c.name in decided and c.name not in failed],
                           "undecided": [c.name for c in checks if c.name not in decided],
                           "findings": [f.__dict__ for f in findings]}
    return report


def write_report(results_dir: str | Path, report: dict[str, Any]) -> Path:
    """Merge ``report`` into ``<results_dir>/audit/checks.json`` (other defenses' entries stay)."""
    path = Path(results_dir) / AUDIT_FOLDER / REPORT
    merged = {**read_report(results_dir), **report}
    atomic_write_text(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return path


def read_report(results_dir: str | Path) -> dict[str, Any]:
    path = Path(results_dir) / AUDIT_FOLDER / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def format_report(report: dict[str, Any], defenses: list[str] | None = None) -> str:
    """One block per defense: each check passed, failed (with its evidence) or undecided."""
    lines = []
    for defense in defenses or sorted(report):
        entry = report.get(defense)
        if entry is None:
            lines.append(f"{defense}: no audit cells")
            continue
        verdict = "FAILED " + ", ".join(entry["failed"]) if entry["failed"] else "passed every decided check"
        lines.append(f"{defense}: {verdict}")
        for name in entry["passed"]:
            lines.append(f"  pass  {name}")
        for name in entry["failed"]:
            for f in entry["findings"]:
                if f["check"] == name and not f["passed"]:
                    lines.append(f"  FAIL  {name}  {f['dataset']} {f['metric']}: {f['detail']}")
        for name in entry["undecided"]:
            lines.append(f"  ----  {name}  (its attacks have no cells here)")
    return "\n".join(lines)


def row_flags(results_dir: str | Path) -> dict[str, str]:
    """What the leaderboard appends to each audited defense's label: ``⚑ check, check`` for
    failed checks, nothing for a defense that passed them (or was not audited)."""
    return {defense: "⚑ " + ", ".join(entry["failed"])
            for defense, entry in read_report(results_dir).items() if entry.get("failed")}
