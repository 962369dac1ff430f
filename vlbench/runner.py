"""The matrix runner: plan defense × attack × dataset cells, run the missing ones, one result
file per cell.

A cell's identity is a hash of its resolved configuration (model, defense and attack with
all parameters, dataset, split, subset size, seed, batch size); its result is written
atomically to ``<out>/cells/<defense>__<attack>__<dataset>__<hash>.json`` the moment it
finishes and never rewritten, so a rerun skips finished cells and a killed run loses none.
All names, parameters and datasets are checked before the first cell runs: bad input fails
with one line and writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__, api, plugins
from .cache import EmbeddingCache
from .datasets import EvalData, get_spec, load_dataset, subset_hash, subset_indices
from .errors import UserError
from .io import atomic_save_tensors, atomic_write_json, stable_hash
from .model import WORLD_MODEL, Victim, load_victim
from .paths import builtin_root, cache_dir
from .tasks import EvalContext, evaluate
from .train import TrainingRun

log = logging.getLogger(__name__)
RESULT_SCHEMA = 1


@dataclass
class PluginSpec:
    """A defense or attack as the config names it: registered name, label, parameters."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, entry: Any, kind: str) -> "PluginSpec":
        if isinstance(entry, str):
            return cls(entry, entry)
        if isinstance(entry, dict) and "name" in entry:
            options = {k: v for k, v in entry.items() if k not in ("name", "label")}
            return cls(str(entry["name"]), str(entry.get("label", entry["name"])), options)
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is None or isinstance(options, dict):
                return cls(str(name), str(name), dict(options or {}))
        raise UserError(f"cannot read {kind} entry {entry!r}",
                        "write a name, {name: {param: value}} or {name: ..., label: ..., param: value}")


@dataclass
class MatrixConfig:
    model: str = WORLD_MODEL
    pretrained: str | None = None
    defenses: list[PluginSpec] = field(default_factory=list)
    attacks: list[PluginSpec] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    limit: int | None = None
    seed: int = 0
    batch_size: int = 256
    out: str = "runs/world"
    device: str = "cpu"

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "MatrixConfig":
        if not isinstance(raw, dict):
            raise UserError(f"config {source} is not a mapping", "see configs/world.yaml for the format")
        known = {f.name for f in dataclasses.fields(cls)}
        # "x-" keys are extension fields: YAML anchors shared by several entries.
        raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
        unknown = set(raw) - known
        if unknown:
            raise UserError(f"config {source} has unknown keys {sorted(unknown)}",
                            f"use only {sorted(known)}")
        values = dict(raw)
        for kind in ("defenses", "attacks"):
            values[kind] = [PluginSpec.parse(e, kind[:-1]) for e in _as_list(values.get(kind, []), kind)]
        values["datasets"] = [str(d) for d in _as_list(values.get("datasets", []), "datasets")]
        return cls(**values)


def _as_list(value: Any, what: str) -> list:
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if isinstance(value, list):
        return value
    raise UserError(f"'{what}' must be a list, got {value!r}", f"write {what}: [a, b]")


def select(specs: list[PluginSpec], names: list[str]) -> list[PluginSpec]:
    """Override a config's list from the command line: keep configured parameters by label."""
    by_label = {spec.label: spec for spec in specs}
    return [by_label.get(name, PluginSpec(name, name)) for name in names]


@dataclass
class Cell:
    defense: api.Defense
    defense_label: str
    attack: api.Attack
    attack_label: str
    dataset: str
    task: str
    config: dict[str, Any]
    id: str
    path: Path


@dataclass
class Plan:
    cells: list[Cell]
    skipped: list[tuple[str, str, str, str]]  # defense, attack, dataset, reason

    def todo(self) -> list[Cell]:
        return [cell for cell in self.cells if not is_finished(cell.path)]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label)


def is_finished(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["schema"] == RESULT_SCHEMA
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_plan(cfg: MatrixConfig) -> Plan:
    """Resolve every name and parameter, check every dataset, and list the cells."""
    if not (cfg.defenses and cfg.attacks and cfg.datasets):
        raise UserError("the matrix is empty", "name at least one defense, attack and dataset")
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError(f"--limit must be positive, got {cfg.limit}", "pass a positive sample count")
    plugins.load_all()
    defenses = [(s.label, api.build("defenses", s.name, s.options)) for s in cfg.defenses]
    attacks = [(s.label, api.build("attacks", s.name, s.options)) for s in cfg.attacks]
    for kind, items in (("defense", defenses), ("attack", attacks)):
        labels = [label for label, _ in items]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise UserError(f"{kind} label {duplicates[0]!r} is used twice",
                            f"give each {kind} entry its own label: key")
    specs = {name: get_spec(name) for name in cfg.datasets}
    cells, skipped = [], []
    out = Path(cfg.out)
    for d_label, defense in defenses:
        for a_label, attack in attacks:
            for name, spec in specs.items():
                reason = attack.skip_reason(spec.task)
                if reason:
                    skipped.append((d_label, a_label, name, reason))
                    continue
                config = {
                    "model": cfg.model, "pretrained": cfg.pretrained,
                    "defense": defense.config(), "attack": {**attack.config(), "threat_model": attack.threat_model()},
                    "dataset": name, "split": spec.split, "dataset_options": spec.options,
                    "transform": spec.transform, "limit": cfg.limit, "seed": cfg.seed,
                    "batch_size": cfg.batch_size,
                }
                digest = stable_hash(config, 10)
                cell_id = f"{_safe(d_label)}__{_safe(a_label)}__{_safe(name)}__{digest}"
                cells.append(Cell(defense, d_label, attack, a_label, name, spec.task, config, cell_id,
                                  out / "cells" / f"{cell_id}.json"))
    return Plan(cells, skipped)


# -- running ------------------------------------------------------------------------------
def code_revision() -> str:
    try:
        root = builtin_root()
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return f"vlbench {__version__}"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"vlbench {__version__}"


def library_versions() -> dict[str, str]:
    import open_clip

    return {"vlbench": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def obtain_model(base: Victim, defense: api.Defense, progress: bool) -> tuple[Victim, dict]:
    """A copy of ``base`` with ``defense`` applied; trained weights are cached and reused."""
    from safetensors.torch import load_file

    victim = copy.deepcopy(base)
    if not defense.trains:
        return victim, {"trained": False}
    key = {"base": victim.fingerprint(), "defense": defense.config(), "data": defense.training_data()}
    path = cache_dir() / "checkpoints" / f"{_safe(defense.name)}-{stable_hash(key, 20)}.safetensors"
    if path.is_file():
        try:
            victim.model.load_state_dict(load_file(str(path)))
            victim.weights_changed()
            return victim, {"trained": True, "checkpoint": str(path), "reused": True}
        except Exception as exc:  # a damaged checkpoint is rebuilt, not trusted
            log.warning("checkpoint %s unreadable (%s); training again", path, exc)
    # Intermediate checkpoints live beside the final one, so a killed run resumes training.
    workdir = path.with_suffix(".partial")
    summary = defense.fit(victim, TrainingRun(progress=progress, workdir=workdir))
    victim.requires_grad_(False)
    victim.eval()
    victim.weights_changed()
    atomic_save_tensors(path, victim.model.state_dict(),
                        metadata={"key": json.dumps(key, default=str), "summary": json.dumps(summary)})
    shutil.rmtree(workdir, ignore_errors=True)
    return victim, {"trained": True, "checkpoint": str(path), "reused": False, "fit": summary}


def cell_warnings(task: str, metrics: dict[str, float]) -> list[str]:
    warnings = []
    pairs = [(k, f"clean_{k}") for k in metrics if f"clean_{k}" in metrics]
    for robust, clean in pairs:
        if metrics[robust] > metrics[clean] + 1e-9:
            warnings.append(f"robust {robust} ({metrics[robust]:.2f}) above clean ({metrics[clean]:.2f}): "
                            "the attack may be broken or too weak")
    return warnings


def _cell_seed(seed: int, cell: Cell) -> int:
    return int(stable_hash({"seed": seed, "dataset": cell.dataset, "attack": cell.config["attack"]}, 8), 16)


def run_matrix(cfg: MatrixConfig, progress: bool = True, cache: EmbeddingCache | None = None) -> Plan:
    plan = make_plan(cfg)
    for d, a, name, reason in plan.skipped:
        log.info("skip %s × %s × %s: %s", d, a, name, reason)
    todo = plan.todo()
    # Check every dataset loads before spending compute (a missing one is bad input).
    datasets: dict[str, EvalData] = {name: load_dataset(name) for name in {c.dataset for c in todo}}
    for plugin in {id(p): p for c in todo for p in (c.attack, c.defense)}.values():
        plugin.prepare()
    out = Path(cfg.out)
    for stale in (out / "cells").glob(".*.tmp") if (out / "cells").is_dir() else ():
        stale.unlink(missing_ok=True)  # left by a run killed mid-write
    cache = cache or EmbeddingCache()
    revision, versions = code_revision(), library_versions()
    base = load_victim(cfg.model, cfg.pretrained, cfg.device) if todo else None
    if base is not None:
        base.requires_grad_(False)
    bar = tqdm(total=len(todo), desc="cells", disable=not progress)
    by_defense: dict[str, list[Cell]] = {}
    for cell in todo:
        by_defense.setdefault(cell.defense_label, []).append(cell)
    for cells in by_defense.values():
        started = time.perf_counter()
        victim, model_info = obtain_model(base, cells[0].defense, progress)
        model_seconds = time.perf_counter() - started
        ctx = EvalContext(victim, cache, cfg.batch_size, progress, cfg.seed)
        for cell in cells:
            data = datasets[cell.dataset]
            indices = subset_indices(len(data), cfg.limit, cfg.seed)
            generator = torch.Generator().manual_seed(_cell_seed(cfg.seed, cell))
            torch.manual_seed(_cell_seed(cfg.seed, cell))
            bar.set_postfix_str(cell.id.rsplit("__", 1)[0])
            t0 = time.perf_counter()
            cell.attack.take_notes(), cell.attack.take_adjustments()
            metrics = evaluate(ctx, data, indices, cell.attack, generator)
            result = {
                "schema": RESULT_SCHEMA, "cell": cell.id,
                "defense": cell.defense_label, "attack": cell.attack_label,
                "dataset": cell.dataset, "task": cell.task, "config": cell.config,
                "metrics": metrics, "n": len(indices),
                "subset_hash": subset_hash(cell.dataset, data.spec.split, indices),
                "seed": cfg.seed, "versions": versions, "code_revision": revision,
                "model": {"fingerprint": victim.fingerprint(), **model_info},
                "timings": {"evaluate_s": round(time.perf_counter() - t0, 3),
                            "model_s": round(model_seconds, 3)},
                "warnings": cell_warnings(cell.task, metrics) + cell.attack.take_notes(),
                "adjustments": cell.attack.take_adjustments(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_json(cell.path, result)
            bar.update(1)
    bar.close()
    return plan
