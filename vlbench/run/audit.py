"""The gradient-masking audit as a run: the audit's attacks against chosen defenses, as a
matrix of its own in ``<out>/audit``, then its checks (:mod:`vlbench.reporting.checks`).

An audit config (``configs/audit.yaml`` by default) lists attacks, as a matrix config does,
and the checks that compare them; ``limit`` optionally sets its own subset size. The audit
runs on the matrix's model, datasets, seed and precision, and its defenses are the matrix's
entries (same labels and parameters, so the same cached checkpoints). Its cells are
ordinary cells, keyed, cached and resumed like any others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlbench.schema import read_yaml
from vlbench.errors import UserError
from vlbench.reporting import checks as checking
from vlbench.reporting.leaderboard import load_results
from vlbench.run.matrix import MatrixConfig, PluginSpec, _as_list
from vlbench.schema import check_type
from vlbench.store.paths import builtin_root


def default_audit_path() -> Path:
    return builtin_root() / "configs" / "audit.yaml"


@dataclass
class AuditConfig:
    attacks: list[PluginSpec] = field(default_factory=list)
    checks: list[checking.Check] = field(default_factory=list)
    limit: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "AuditConfig":
        if not isinstance(raw, dict):
            raise UserError(f"audit config {source} is not a mapping", "see configs/audit.yaml for the format")
        raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
        unknown = set(raw) - {"attacks", "checks", "limit"}
        if unknown:
            raise UserError(f"audit config {source} has unknown keys {sorted(unknown)}", "use attacks, checks and limit")
        attacks = [PluginSpec.parse(e, "attack") for e in _as_list(raw.get("attacks", []), "attacks")]
        found = [checking.Check.from_dict(c, f"audit config {source}") for c in _as_list(raw.get("checks", []), "checks")]
        if not found:
            raise UserError(f"audit config {source} has no checks", "list at least one under checks:")
        labels = {e.label for spec in attacks for e in spec.sweep("attacks")}
        for check in found:
            missing = [a for a in check.attacks if a not in labels]
            if missing:
                raise UserError(f"audit config {source}: check {check.name!r} names attacks {missing} it does not run",
                                f"add them under attacks: or name one of {sorted(labels)}")
        limit = check_type(raw.get("limit"), int | None, f"audit config {source} key 'limit'")
        if limit is not None and limit < 1:
            raise UserError(f"audit config {source} has limit {limit}", "use a positive limit or leave it out")
        return cls(attacks, found, limit)

    @classmethod
    def load(cls, value: Any, source: str = "checks") -> "AuditConfig":
        """From a matrix config's ``checks:`` value: ``true`` (the default audit), the path of
        an audit config, or an audit config written inline."""
        if value is True:
            value = str(default_audit_path())
        if isinstance(value, str):
            path = Path(value)
            if not path.is_file():
                raise UserError(f"audit config {path} does not exist", "check the path, or write checks: true")
            return cls.from_dict(read_yaml(path, "audit config"), str(path))
        if isinstance(value, dict):
            return cls.from_dict(value, source)
        raise UserError(f"cannot read {source}: {value!r}", "write checks: true, a file path, or an audit config")


def audit_matrix(cfg: MatrixConfig, audit: AuditConfig, defenses: list[PluginSpec] | None = None,
                 limit: int | None = None) -> MatrixConfig:
    """The matrix the audit runs: ``cfg``'s model, datasets and settings, ``defenses`` (default:
    all of ``cfg``'s), the audit's attacks and subset size, results in ``<out>/audit``."""
    audited = copy.deepcopy(cfg)
    audited.defenses = list(defenses if defenses is not None else cfg.defenses)
    audited.attacks = list(audit.attacks)
    audited.limit = limit or audit.limit or cfg.limit
    audited.out = str(Path(cfg.out) / checking.AUDIT_FOLDER)
    audited.checks = None
    return audited


def decide(cfg: MatrixConfig, audit: AuditConfig, defenses: list[str] | None = None) -> dict[str, Any]:
    """Run the checks on the audit's cells of ``cfg.out`` and merge them into its report."""
    folder = Path(cfg.out) / checking.AUDIT_FOLDER
    results = [r for r in load_results(folder) if defenses is None or r["defense"] in defenses]
    report = checking.run_checks(results, audit.checks)
    checking.write_report(cfg.out, report)
    return report
