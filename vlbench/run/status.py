"""``vlbench status OUT``: where a results folder's plan stands, per defense and attack.

Read from the folder alone, so it works while any number of workers, shards or SLURM jobs are
running on it, from any machine that sees the folder: the plans the runs recorded
(``plans/``), the finished cells (``cells/``), the failures (``failed/``) and the live
claims (``claims/``, and beside each defense checkpoint for its training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlbench.errors import UserError
from vlbench.run.matrix import is_finished
from vlbench.store.claims import SUFFIX, live_claims, read_claim

STATES = ("done", "running", "failed", "pending")


@dataclass
class CellStatus:
    id: str
    defense: str
    attack: str
    dataset: str
    state: str
    detail: dict | None = None   # the failure record, or the live claim's owner


def read_status(out: str | Path) -> tuple[list[CellStatus], dict[str, str]]:
    """Every planned cell's state, and each trained defense's training state."""
    out = Path(out)
    manifests = sorted((out / "plans").glob("*.json")) if (out / "plans").is_dir() else []
    if not manifests:
        raise UserError(f"{out} holds no plan", f"start a run first: vlbench run matrix --out {out}")
    cells: dict[str, dict] = {}
    checkpoints: dict[str, str] = {}
    for path in manifests:
        manifest = json.loads(path.read_text())
        cells.update({c["id"]: c for c in manifest["cells"]})
        checkpoints.update(manifest.get("checkpoints", {}))
    running = live_claims(out / "claims") if (out / "claims").is_dir() else {}
    found = []
    for cell_id, cell in cells.items():
        failure = out / "failed" / f"{cell_id}.json"
        detail = None
        if is_finished(out / "cells" / f"{cell_id}.json"):
            state = "done"
        elif cell_id in running:
            state = "running"
            owner = running[cell_id].owner
            detail = vars(owner) if owner else None
        elif failure.is_file():
            state = "failed"
            try:
                detail = {**json.loads(failure.read_text()), "record": str(failure)}
            except (OSError, ValueError):
                detail = {"error": "unreadable failure record", "record": str(failure)}
        else:
            state = "pending"
        found.append(CellStatus(cell_id, cell["defense"], cell["attack"], cell["dataset"], state, detail))
    training = {}
    for label, checkpoint in checkpoints.items():
        path = Path(checkpoint)
        claim = read_claim(path.with_name(path.stem + SUFFIX))
        if path.is_file():
            training[label] = "trained"
        elif claim is not None and not claim.stale and claim.owner is not None:
            training[label] = f"training ({claim.owner.host} pid {claim.owner.pid}, log {claim.owner.log or '-'})"
        else:
            training[label] = "not trained"
    return found, training


def format_status(out: str | Path) -> str:
    from tabulate import tabulate

    cells, training = read_status(out)
    defenses = list(dict.fromkeys(c.defense for c in cells))
    attacks = list(dict.fromkeys(c.attack for c in cells))
    rows = []
    for defense in defenses:
        row = [defense]
        for attack in attacks:
            mine = [c for c in cells if c.defense == defense and c.attack == attack]
            counts = {s: sum(c.state == s for c in mine) for s in STATES}
            row.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "-")
        row.append(training.get(defense, "no training"))
        rows.append(row)
    totals = {s: sum(c.state == s for c in cells) for s in STATES}
    lines = [f"{out}: {len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in totals.items()),
             tabulate(rows, headers=["defense", *attacks, "training"])]
    running = [c for c in cells if c.state == "running" and c.detail]
    if running:
        lines.append("running:")
        lines += [f"  {c.id}: {c.detail['host']} pid {c.detail['pid']}, log {c.detail.get('log') or '-'}"
                  for c in running]
    failed = [c for c in cells if c.state == "failed"]
    if failed:
        lines.append("failed (rerun them with vlbench run matrix --retry-failed):")
        for c in failed:
            detail = c.detail or {}
            where = detail.get("log") or "the run's terminal"
            lines.append(f"  {c.id} [{detail.get('stage', '?')}]: {detail.get('error', '?')}")
            lines.append(f"    log: {where}; traceback in {detail.get('record')}")
    return "\n".join(lines)
