"""The matrix runner: plan defense × attack × dataset cells, run the missing ones, one result
file per cell.

A cell's identity is a hash of its resolved configuration (model, defense and attack with
all parameters and versions, dataset, split, subset size, seed, batch size, precision, the
world CLIP's checkpoint) with the result schema and, for a trained defense, the training
code's version (:mod:`vlbench.store.artifacts`); its result is
written atomically to ``<out>/cells/<defense>__<attack>__<dataset>__<hash>.json`` the moment
it finishes and never rewritten, so a rerun skips finished cells and a killed run loses none.
All names, parameters and datasets are checked before the first cell runs: bad input fails
with one line and writes nothing. Before any work a run reports its plan (cells to run and
done, models to build, train or reuse, a time estimate from a warm-up of a second on this
machine, :mod:`vlbench.monitor.cost`), and at its end the time by phase (:mod:`vlbench.monitor.timing`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench import __version__, api
from vlbench.data.datasets import EvalData, get_spec, load_dataset, subset_hash, subset_indices
from vlbench.errors import UserError
from vlbench.evaluation.context import EvalContext
from vlbench.evaluation.tasks import evaluate, tasks
from vlbench.models.precision import check_precision
from vlbench.models.victim import WORLD_MODEL, Victim, is_world_default, load_victim
from vlbench.monitor import timing
from vlbench.monitor.cost import Rates, Work
from vlbench.monitor.progress import progress as progress_bar
from vlbench.schema import check_type
from vlbench.store.artifacts import RESULT_SCHEMA, artifact_key, artifact_path
from vlbench.store.embeddings import EmbeddingCache
from vlbench.store.files import (atomic_save_tensors, atomic_write_json, build_once, remove_stale_temporaries,
                                 stable_hash)
from vlbench.store.paths import builtin_root
from vlbench.training.loop import TrainingRun

log = logging.getLogger(__name__)


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
    #: fp32 (default), bf16 or fp16: see vlbench.models.precision
    precision: str = "fp32"

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
        hints = typing.get_type_hints(cls)
        values = {key: check_type(value, hints[key], f"config {source} key {key!r}")
                  for key, value in raw.items() if key not in ("defenses", "attacks", "datasets")}
        for kind in ("defenses", "attacks"):
            values[kind] = [PluginSpec.parse(e, kind[:-1]) for e in _as_list(raw.get(kind, []), kind)]
        values["datasets"] = [str(d) for d in _as_list(raw.get("datasets", []), "datasets")]
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


def load_base(cfg: MatrixConfig) -> Victim:
    """The base model every defense starts from; the world CLIP is pretrained if needed."""
    if is_world_default(cfg.model, cfg.pretrained):
        from vlbench.world.pretrain import world_victim

        return world_victim(cfg.precision, cfg.device)
    return load_victim(cfg.model, cfg.pretrained, cfg.device, precision=cfg.precision)


def _base_identity(cfg: MatrixConfig) -> str | None:
    """What names the base model beyond its config: the world CLIP's checkpoint, whose name
    carries its pretraining config and the training code's version."""
    if not is_world_default(cfg.model, cfg.pretrained):
        return None
    from vlbench.world.pretrain import PretrainConfig
    from vlbench.world.pretrain import checkpoint_path as world_path

    return world_path(PretrainConfig(precision=cfg.precision)).stem


def make_plan(cfg: MatrixConfig) -> Plan:
    """Resolve every name and parameter, check every dataset, and list the cells."""
    if not (cfg.defenses and cfg.attacks and cfg.datasets):
        raise UserError("the matrix is empty", "name at least one defense, attack and dataset")
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError(f"--limit must be positive, got {cfg.limit}", "pass a positive sample count")
    if cfg.batch_size <= 0:
        raise UserError(f"the batch size must be positive, got {cfg.batch_size}",
                        "set --batch-size (or batch_size: in the config) to a positive number")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file, not a folder", "name a folder (new or an earlier run's)")
    check_precision(cfg.precision, cfg.device)
    api.discover()
    defenses = [(s.label, api.build("defenses", s.name, s.options)) for s in cfg.defenses]
    attacks = [(s.label, api.build("attacks", s.name, s.options)) for s in cfg.attacks]
    for kind, items in (("defense", defenses), ("attack", attacks)):
        labels = [label for label, _ in items]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise UserError(f"{kind} label {duplicates[0]!r} is used twice",
                            f"give each {kind} entry its own label: key")
    specs = {name: get_spec(name) for name in cfg.datasets}
    base = _base_identity(cfg)
    cells, skipped = [], []
    out = Path(cfg.out)
    for d_label, defense in defenses:
        for a_label, attack in attacks:
            for name, spec in specs.items():
                reason = attack.skip_reason(spec.task)
                if reason:
                    skipped.append((d_label, a_label, name, reason))
                    continue
                config = artifact_key({
                    "model": cfg.model, "pretrained": cfg.pretrained,
                    "defense": defense.config(), "attack": {**attack.config(), "threat_model": attack.threat_model()},
                    "dataset": name, "split": spec.split, "dataset_options": spec.options,
                    "transform": spec.transform, "limit": cfg.limit, "seed": cfg.seed,
                    "batch_size": cfg.batch_size, "precision": cfg.precision, "base": base,
                }, trained=defense.trains)
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
    """Versions, and the CPU kernel family PyTorch runs (results agree across families to
    sampling noise, not bit for bit)."""
    import open_clip

    versions = {"vlbench": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        versions["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    return versions


def checkpoint_path(base: Victim, defense: api.Defense) -> tuple[Path, dict]:
    """Where ``defense`` trained from ``base`` is cached, and the key that names it."""
    key = {"base": base.fingerprint(), "defense": defense.config(), "data": defense.training_data(),
           "precision": base.precision}
    return artifact_path("checkpoints", key, trained=True, prefix=f"{_safe(defense.name)}-", suffix=".safetensors")


def obtain_model(base: Victim, defense: api.Defense, progress: bool, label: str | None = None) -> tuple[Victim, dict]:
    """A copy of ``base`` with ``defense`` applied; trained weights are cached and reused."""
    from safetensors.torch import load_file

    victim = copy.deepcopy(base)
    if not defense.trains:
        return victim, {"trained": False}
    path, key = checkpoint_path(victim, defense)

    def reuse() -> dict | None:
        if not path.is_file():
            return None
        try:
            victim.model.load_state_dict(load_file(str(path)))
        except Exception as exc:  # a damaged checkpoint is rebuilt, not trusted
            log.warning("checkpoint %s unreadable (%s); training again", path, exc)
            return None
        victim.weights_changed()
        return {"trained": True, "checkpoint": str(path), "reused": True}

    def train() -> dict:
        # Intermediate checkpoints live beside the final one, so a killed run resumes training.
        workdir = path.with_suffix(".partial")
        with timing.phase(f"train {label or defense.name}"):
            summary = defense.fit(victim, TrainingRun(progress=progress, workdir=workdir, label=label))
        victim.requires_grad_(False)
        victim.eval()
        victim.weights_changed()
        atomic_save_tensors(path, victim.model.state_dict(),
                            metadata={"key": json.dumps(key, default=str), "summary": json.dumps(summary)})
        shutil.rmtree(workdir, ignore_errors=True)
        return {"trained": True, "checkpoint": str(path), "reused": False, "fit": summary}

    return victim, build_once(path.with_suffix(".lock"), reuse, train, f"training {defense.name}")


# -- the plan, as the user sees it before any work starts ---------------------------------
def _pending_pretraining(cfg: MatrixConfig):
    """The world pretraining this run will do first, or None."""
    from vlbench.world.pretrain import PretrainConfig
    from vlbench.world.pretrain import checkpoint_path as world_path

    if not is_world_default(cfg.model, cfg.pretrained):
        return None
    config = PretrainConfig(precision=cfg.precision)
    return None if world_path(config).is_file() else config


def _architecture_victim(cfg: MatrixConfig) -> Victim:
    """A randomly initialised world CLIP, to time operations before its pretraining."""
    from vlbench.world.pretrain import build_victim

    torch.manual_seed(0)
    return build_victim(precision=cfg.precision).to(cfg.device)


def _cell_work(cell: Cell, data: EvalData, indices: list[int]) -> Work | None:
    texts, classes = tasks.get(cell.task).sizes(data, indices)
    return cell.attack.work(cell.task, len(indices), texts, classes)


def describe_plan(cfg: MatrixConfig, plan: Plan, todo: list[Cell], datasets: dict[str, EvalData],
                  rates: Rates, base: Victim | None) -> list[str]:
    """A few lines: cells to run and done, what is built, trained or reused, and the time
    estimate from ``rates``."""
    from vlbench.monitor.progress import clock

    done = len(plan.cells) - len(todo)
    lines = [f"plan: {len(plan.cells)} cells in {cfg.out} ({len(todo)} to run, {done} already done"
             + (f", {len(plan.skipped)} skipped: attack not defined for the task" if plan.skipped else "")
             + f"); {cfg.model} on {cfg.device}, {cfg.precision}, {torch.get_num_threads()} threads"]
    builds: dict[str, Work] = {}
    pretraining = _pending_pretraining(cfg)
    if pretraining is not None:
        from vlbench.world.pretrain import pretrain_work

        builds["world CLIP pretraining"] = pretrain_work(pretraining)
    plugins_used = {id(p): p for c in todo for p in (c.attack, c.defense)}.values()
    for plugin in plugins_used:
        for name, work in plugin.pending():
            builds[name] = work
    estimate, unknown = sum(rates.seconds(w) for w in builds.values()), 0
    if builds:
        lines.append("  build: " + ", ".join(f"{n} ~{clock(rates.seconds(w))}" for n, w in builds.items()))
    train, reuse = [], []
    for label, defense in {c.defense_label: c.defense for c in todo}.items():
        if not defense.trains:
            continue
        if base is not None and checkpoint_path(base, defense)[0].is_file():
            reuse.append(label)
            continue
        work = defense.work()
        if work is None:
            unknown += 1
            train.append(f"{label} ?")
        else:
            estimate += rates.seconds(work)
            train.append(f"{label} ~{clock(rates.seconds(work))}")
    if train or reuse:
        lines.append("  train: " + (", ".join(train) or "none") + "; reuse: " + (", ".join(reuse) or "none"))
    evaluation = 0.0
    for cell in todo:
        data = datasets[cell.dataset]
        work = _cell_work(cell, data, subset_indices(len(data), cfg.limit, cfg.seed))
        if work is None:
            unknown += 1
        else:
            evaluation += rates.seconds(work)
    estimate += evaluation
    if todo:
        lines.append(f"  evaluate: {len(todo)} cells ~{clock(evaluation)}")
    note = f", leaving out {unknown} step(s) of unknown cost" if unknown else ""
    lines.append(f"  estimate: ~{clock(estimate)}{note} (timed on this machine in a {rates.warmup_seconds:.1f} s "
                 f"warm-up: image forward+backward {1000 * rates.image_grads:.2f} ms, text "
                 f"{1000 * rates.text_forwards:.3f} ms per sample)")
    return lines


def cell_warnings(task: str, metrics: dict[str, float]) -> list[str]:
    warnings = []
    pairs = [(k, f"clean_{k}") for k in metrics if f"clean_{k}" in metrics]
    for robust, clean in pairs:
        if metrics[robust] > metrics[clean] + 1e-9:
            warnings.append(f"robust {robust} ({metrics[robust]:.2f}) above clean ({metrics[clean]:.2f}): "
                            "the attack may be broken or too weak")
    return warnings


def _without_versions(config):
    if isinstance(config, dict):
        return {k: _without_versions(v) for k, v in config.items() if k != "version"}
    if isinstance(config, list):
        return [_without_versions(v) for v in config]
    return config


def _cell_seed(seed: int, cell: Cell) -> int:
    # A version bump recomputes a cell with the same random draws, so its numbers move only
    # where the code changed what they mean.
    attack = _without_versions(cell.config["attack"])
    return int(stable_hash({"seed": seed, "dataset": cell.dataset, "attack": attack}, 8), 16)


def run_matrix(cfg: MatrixConfig, progress: bool = True, cache: EmbeddingCache | None = None,
               report: Callable[[str], None] | None = None) -> Plan:
    """Run the cells of ``cfg`` that have no result yet. With ``report``, the plan and its
    time estimate are reported before any work starts, and the time per phase at the end."""
    started = time.perf_counter()
    timing.take()
    plan = make_plan(cfg)
    for d, a, name, reason in plan.skipped:
        log.info("skip %s × %s × %s: %s", d, a, name, reason)
    todo = plan.todo()
    # Check every dataset loads before spending compute (a missing one is bad input).
    datasets: dict[str, EvalData] = {name: load_dataset(name) for name in {c.dataset for c in todo}}
    base = None
    if todo and _pending_pretraining(cfg) is None:
        base = load_base(cfg)
    for defense in {id(c.defense): c.defense for c in todo}.values():
        # only the defenses this run will train: a cached checkpoint needs no training data
        if defense.trains and (base is None or not checkpoint_path(base, defense)[0].is_file()):
            defense.check_training_data()
    if report is not None:
        if todo:
            rates = Rates.measure(base if base is not None else _architecture_victim(cfg),
                                  min(cfg.batch_size, 64))
            for line in describe_plan(cfg, plan, todo, datasets, rates, base):
                report(line)
        else:
            report(f"plan: all {len(plan.cells)} cells of {cfg.out} are done")
    for plugin in {id(p): p for c in todo for p in (c.attack, c.defense)}.values():
        plugin.prepare()
    out = Path(cfg.out)
    if (out / "cells").is_dir():
        remove_stale_temporaries(out / "cells")  # left by a run killed mid-write
    cache = cache or EmbeddingCache()
    revision, versions = code_revision(), library_versions()
    if base is None and todo:
        base = load_base(cfg)
    if base is not None:
        base.requires_grad_(False)
    bar = progress_bar(total=len(todo), desc="cells", enabled=progress)
    by_defense: dict[str, list[Cell]] = {}
    for cell in todo:
        by_defense.setdefault(cell.defense_label, []).append(cell)
    for label, cells in by_defense.items():
        model_started = time.perf_counter()
        victim, model_info = obtain_model(base, cells[0].defense, progress, label)
        model_seconds = time.perf_counter() - model_started
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
            seconds = time.perf_counter() - t0
            timing.record(f"evaluate {cell.attack_label}", seconds)
            result = {
                "schema": RESULT_SCHEMA, "cell": cell.id,
                "defense": cell.defense_label, "attack": cell.attack_label,
                "dataset": cell.dataset, "task": cell.task, "config": cell.config,
                "metrics": metrics, "n": len(indices),
                "subset_hash": subset_hash(cell.dataset, data.spec.split, indices),
                "seed": cfg.seed, "precision": cfg.precision, "versions": versions, "code_revision": revision,
                "model": {"fingerprint": victim.fingerprint(), **model_info},
                "timings": {"evaluate_s": round(seconds, 3), "model_s": round(model_seconds, 3)},
                "warnings": cell_warnings(cell.task, metrics) + cell.attack.take_notes(),
                "adjustments": cell.attack.take_adjustments(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_json(cell.path, result)
            bar.update(1)
    bar.close()
    if report is not None and todo:
        report("time by phase:\n" + timing.summary(timing.take(), time.perf_counter() - started))
    return plan
