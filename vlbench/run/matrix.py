"""The matrix runner: plan defense × attack × dataset cells, run the missing ones, one result
file per cell.

A cell's identity is a hash of its resolved configuration (its row's base model, by the
fingerprint of its weights; defense and attack with all parameters and versions, dataset,
split, subset size, seed, batch size, precision) with the result schema and, for a trained
defense, the training code's version (:mod:`vlbench.store.artifacts`); its result is
written atomically to ``<out>/cells/<defense>__<attack>__<dataset>__<hash>.json`` the moment
it finishes and never rewritten, so a rerun skips finished cells and a killed run loses none.
All names, parameters and datasets are checked before the first cell runs: bad input fails
with one line and writes nothing. Before any work a run reports its plan (cells to run and
done, models to build, train or reuse, a time estimate from a warm-up of a second on this
machine, :mod:`vlbench.monitor.cost`), and at its end the time by phase (:mod:`vlbench.monitor.timing`).

Many processes may run the same plan on one folder (workers, shards, SLURM jobs: see
:mod:`vlbench.run.workers` and :mod:`vlbench.run.slurm`): each cell and each defense's
training is claimed before it runs (:mod:`vlbench.store.claims`), so none is computed twice
and a dead worker's work is taken over. A failing cell is recorded in ``<out>/failed/`` and
the run goes on; ``Selection(retry_failed=True)`` reruns only those. The plan itself is
recorded in ``<out>/plans/`` for ``vlbench status``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench import __version__, api
from vlbench.data.datasets import EvalData, get_spec, load_dataset, subset_hash, subset_indices
from vlbench.data.loading import EvalLoaders, Loading
from vlbench.errors import UserError
from vlbench.evaluation.context import EvalContext
from vlbench.evaluation.tasks import evaluate, tasks
from vlbench.models.card import ModelSpec, config_entries
from vlbench.models.factory import architecture_victim
from vlbench.models.precision import check_precision
from vlbench.models.victim import Victim
from vlbench.monitor import timing
from vlbench.monitor.cost import Rates, Work
from vlbench.monitor.progress import progress as progress_bar
from vlbench.run.bases import BaseModels, model_identity, pending_builds, row_model
from vlbench.schema import check_type
from vlbench.store.artifacts import RESULT_SCHEMA, artifact_path, cell_key, without_versions
from vlbench.store.embeddings import EmbeddingCache
from vlbench.store.claims import Claim, read_claim
from vlbench.store.files import atomic_save_tensors, atomic_write_json, remove_stale_temporaries, stable_hash
from vlbench.store.paths import builtin_root
from vlbench.training.loop import TrainingRun

log = logging.getLogger(__name__)


@dataclass
class PluginSpec:
    """A defense or attack as the config names it: registered name, label, parameters; a
    defense row also its ``base`` model entry (default: the config's ``model``)."""

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    base: str | None = None

    @classmethod
    def parse(cls, entry: Any, kind: str) -> "PluginSpec":
        if isinstance(entry, str):
            return cls(entry, entry)
        if isinstance(entry, dict) and "name" in entry:
            return cls._row(str(entry["name"]), entry.get("label"), entry, kind)
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is None or isinstance(options, dict):
                return cls._row(str(name), None, dict(options or {}), kind)
        raise UserError(f"cannot read {kind} entry {entry!r}",
                        "write a name, {name: {param: value}} or {name: ..., label: ..., base: MODEL, param: value}")

    @classmethod
    def _row(cls, name: str, label: Any, entry: dict, kind: str) -> "PluginSpec":
        options = {k: v for k, v in entry.items() if k not in ("name", "label", "base")}
        base = entry.get("base")
        if base is not None and kind != "defense":
            raise UserError(f"{kind} {name!r} names a base model", "base: belongs to a defense row")
        # a row on another model is named by it: the model itself (`none`), or the defense on it
        label = label or (name if base is None else str(base) if name == "none" else f"{name}-{base}")
        return cls(name, str(label), options, None if base is None else str(base))

    def sweep(self, kind: str) -> list["PluginSpec"]:
        """The entries this one stands for: a list given for a parameter that is not a list
        is a sweep, one entry per value, labelled ``label@value`` (``label@k=v,k2=v2`` when
        several parameters sweep, over their product)."""
        registry = api.registry_for(kind)
        if self.name not in registry:
            return [self]  # api.build names the problem
        hints = typing.get_type_hints(registry.get(self.name).Params)
        swept = {key: value for key, value in self.options.items()
                 if isinstance(value, list) and key in hints and not _is_sequence_type(hints[key])}
        if not swept:
            return [self]
        if any(not values for values in swept.values()):
            empty = next(key for key, values in swept.items() if not values)
            raise UserError(f"{kind[:-1]} {self.label!r} sweeps {empty} over no values", f"list at least one {empty}")
        entries = []
        for values in itertools.product(*swept.values()):
            chosen = dict(zip(swept, values))
            shown = (_shown(values[0]) if len(chosen) == 1
                     else ",".join(f"{key}={_shown(value)}" for key, value in chosen.items()))
            entries.append(PluginSpec(self.name, f"{self.label}@{shown}", {**self.options, **chosen}, self.base))
        return entries


def _is_sequence_type(hint: Any) -> bool:
    """Whether a parameter declared as ``hint`` takes a list itself (so a list is no sweep)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any((typing.get_origin(o) or o) in (list, tuple) or o is Any for o in options)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class ExecutorConfig:
    """Where the cells run: the config's ``executor:`` section (``--executor``, ``--workers``
    override). ``local`` with one worker is the plain sequential run."""

    name: typing.Literal["local", "slurm"] = "local"
    #: local: worker processes on this machine
    workers: int = 1
    #: slurm: per-job resources and the array's limits (submitit's SlurmExecutor)
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_limit_min: int = 240
    array_parallelism: int = 32
    #: extra sbatch options, e.g. {account: lab, qos: high, constraint: a100}
    sbatch: dict[str, Any] = field(default_factory=dict)
    #: one evaluation task per defense, or per defense and dataset
    group_by: typing.Literal["defense", "dataset"] = "defense"
    #: requeues after a time limit or preemption before a job is given up
    max_requeues: int = 3
    #: seconds before the time limit that a job is told to checkpoint and requeue
    signal_delay_s: int = 90

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "ExecutorConfig":
        if not isinstance(raw, dict):
            raise UserError(f"config {source} key 'executor' must be a mapping, got {raw!r}",
                            "write executor: {name: slurm, partition: gpu, ...}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise UserError(f"config {source} executor has unknown keys {sorted(unknown)}", f"use only {sorted(known)}")
        hints = typing.get_type_hints(cls)
        values = {k: check_type(v, hints[k], f"config {source} executor key {k!r}") for k, v in raw.items()}
        executor = cls(**values)
        executor.validate()
        return executor

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"the number of workers must be at least 1, got {self.workers}", "pass --workers 2 or more")


@dataclass
class MatrixConfig:
    #: the base model of every defense row without a base: of its own: a model card entry
    #: (vlbench ls models), or an open_clip architecture given ``pretrained`` weights
    model: str = "world-clip"
    #: other weights for ``model``: an open_clip tag, hf-hub:ORG/NAME or a path
    pretrained: str | None = None
    #: the config's own model card entries (a user's checkpoint beside the released ones)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    defenses: list[PluginSpec] = field(default_factory=list)
    attacks: list[PluginSpec] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    limit: int | None = None
    seed: int = 0
    #: train every training defense once per seed (its ``seed`` parameter), each seed with
    #: cells of its own; the leaderboard's row is their mean, with an interval over seeds and
    #: test samples. None: each defense's own seed (one training)
    training_seeds: list[int] | None = None
    batch_size: int = 256
    out: str = "runs/world"
    device: str = "cpu"
    #: fp32 (default), bf16 or fp16: see vlbench.models.precision
    precision: str = "fp32"
    #: DataLoader worker processes that decode images (0: in the main process, as the world needs)
    data_workers: int = 0
    #: CPU threads per process (default: all cores for one process, cores/N for N workers, a
    #: SLURM job's allocation); trained weights depend on it in their last bits (see README)
    threads: int | None = None
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    #: the gradient-masking audit to run after the matrix (vlbench.run.audit): true for
    #: configs/audit.yaml, the path of an audit config, or one written inline
    checks: bool | str | dict | None = None

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
                  for key, value in raw.items() if key not in ("defenses", "attacks", "datasets", "executor", "models")}
        values["executor"] = ExecutorConfig.from_dict(raw.get("executor") or {}, source)
        values["models"] = config_entries(raw.get("models") or {}, f"config {source}")
        for kind in ("defenses", "attacks"):
            values[kind] = [PluginSpec.parse(e, kind[:-1]) for e in _as_list(raw.get(kind, []), kind)]
        values["datasets"] = [str(d) for d in _as_list(raw.get("datasets", []), "datasets")]
        return cls(**values)


def read_config(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A matrix config file's mapping. ``extends: OTHER.yaml`` (relative to the file) reads
    that config first and replaces its top-level keys with this file's: a protocol that is
    another with a few keys changed says only those."""
    from vlbench.schema import read_yaml

    raw = read_yaml(path, "config")
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    base = Path(path).parent / str(raw.pop("extends"))
    if base.resolve() in seen or base.resolve() == Path(path).resolve():
        raise UserError(f"config {path} extends {base}, which extends it back", "remove one of the extends: keys")
    if not base.is_file():
        raise UserError(f"config {path} extends {base}, which does not exist", "name a config beside it")
    parent = read_config(base, (*seen, Path(path).resolve()))
    if not isinstance(parent, dict):
        raise UserError(f"config {base} is not a mapping", "see configs/world.yaml for the format")
    return {**parent, **raw}


def _as_list(value: Any, what: str) -> list:
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if isinstance(value, list):
        return value
    raise UserError(f"'{what}' must be a list, got {value!r}", f"write {what}: [a, b]")


def select(specs: list[PluginSpec], names: list[str]) -> list[PluginSpec]:
    """Override a config's list from the command line: keep configured parameters (and base)
    by label."""
    by_label = {spec.label: spec for spec in specs}
    return [by_label.get(name, PluginSpec(name, name)) for name in names]


@dataclass
class Cell:
    defense: api.Defense
    defense_label: str
    #: the row's base model entry
    base: ModelSpec
    attack: api.Attack
    attack_label: str
    dataset: str
    task: str
    config: dict[str, Any]
    id: str
    path: Path
    #: the defense's training seed (its ``seed`` parameter) where it trains with one
    training_seed: int | None = None
    #: whether the config trains this row with several seeds (``training_seeds``)
    seeded: bool = False

    @property
    def row(self) -> str:
        """The trained model this cell evaluates: its label, and its seed where a row trains
        with several (what trainings, claims and evaluation groups are keyed by)."""
        return row_name(self.defense_label, self.training_seed, self.seeded)


def row_name(label: str, training_seed: int | None, seeded: bool) -> str:
    """A defense row's label, with ``@seedN`` where the config trains it with several seeds."""
    return f"{label}@seed{training_seed}" if seeded else label


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
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"threads must be at least 1, got {cfg.threads}", "pass --threads 1 or more, or leave it unset")
    if cfg.data_workers < 0:
        raise UserError(f"data_workers must be 0 or more, got {cfg.data_workers}",
                        "set --data-workers (or data_workers: in the config) to 0 or a positive number")
    if cfg.batch_size <= 0:
        raise UserError(f"the batch size must be positive, got {cfg.batch_size}",
                        "set --batch-size (or batch_size: in the config) to a positive number")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file, not a folder", "name a folder (new or an earlier run's)")
    check_precision(cfg.precision, cfg.device)
    api.discover()
    rows = [e for s in cfg.defenses for e in s.sweep("defenses")]
    defenses = [(e.label, api.build("defenses", e.name, e.options)) for e in rows]
    rows, defenses, seeds = seeded_rows(cfg, rows, defenses)
    attacks = [(e.label, api.build("attacks", e.name, e.options)) for s in cfg.attacks for e in s.sweep("attacks")]
    rows_named = [label if cfg.training_seeds is None else (label, seed) for (label, _), seed in zip(defenses, seeds)]
    for kind, labels in (("defense", rows_named), ("attack", [label for label, _ in attacks])):
        duplicates = sorted({label for label in labels if labels.count(label) > 1}, key=str)
        if duplicates:
            shown = duplicates[0] if isinstance(duplicates[0], str) else duplicates[0][0]
            raise UserError(f"{kind} label {shown!r} is used twice",
                            f"give each {kind} entry its own label: key")
    specs = {name: get_spec(name) for name in cfg.datasets}
    models = [row_model(cfg, e) for e in rows]
    identities = {m.name: model_identity(m, cfg) for m in {m.name: m for m in models}.values()}
    cells, skipped = [], []
    out = Path(cfg.out)
    for (d_label, defense), model, training_seed in zip(defenses, models, seeds):
        seeded = cfg.training_seeds is not None and training_seed is not None
        row = row_name(d_label, training_seed, seeded)
        for a_label, attack in attacks:
            for name, spec in specs.items():
                reason = attack.skip_reason(spec.task)
                if reason:
                    skipped.append((d_label, a_label, name, reason))
                    continue
                config = cell_key({
                    "model": identities[model.name],
                    "defense": defense.config(), "attack": {**attack.config(), "threat_model": attack.threat_model()},
                    "dataset": name, "split": spec.split, "dataset_options": spec.options,
                    "transform": spec.transform, "limit": cfg.limit, "seed": cfg.seed,
                    "batch_size": cfg.batch_size, "precision": cfg.precision,
                }, trained=defense.trains)
                digest = stable_hash(config, 10)
                cell_id = f"{_safe(row)}__{_safe(a_label)}__{_safe(name)}__{digest}"
                cells.append(Cell(defense, d_label, model, attack, a_label, name, spec.task, config, cell_id,
                                  out / "cells" / f"{cell_id}.json", training_seed, seeded))
    return Plan(cells, skipped)


def seeded_rows(cfg: MatrixConfig, rows: list[PluginSpec], defenses: list[tuple[str, api.Defense]]):
    """Each training defense once per ``cfg.training_seeds`` (its ``seed`` parameter set), under
    its own label; returns the rows, the built defenses and each one's training seed (None for
    a defense that does not train or has no seed)."""
    def seed_of(defense: api.Defense) -> int | None:
        return getattr(defense.params, "seed", None) if defense.trains else None

    if cfg.training_seeds is None:
        return rows, defenses, [seed_of(d) for _, d in defenses]
    if not cfg.training_seeds or len(set(cfg.training_seeds)) != len(cfg.training_seeds):
        raise UserError(f"training_seeds {cfg.training_seeds} must list distinct seeds", "write e.g. training_seeds: [0, 1, 2]")
    out_rows, out_defenses, seeds = [], [], []
    for row, (label, defense) in zip(rows, defenses):
        if not defense.trains:
            out_rows.append(row), out_defenses.append((label, defense)), seeds.append(None)
            continue
        if "seed" not in {f.name for f in dataclasses.fields(defense.Params)}:
            raise UserError(f"defense {label!r} trains but has no seed parameter, so training_seeds cannot vary it",
                            "give its Params a seed field (TrainingParams has one), or drop training_seeds")
        if "seed" in row.options:
            raise UserError(f"defense {label!r} sets seed: while the config sets training_seeds",
                            "drop one: training_seeds trains every training defense once per seed")
        for seed in cfg.training_seeds:
            entry = dataclasses.replace(row, options={**row.options, "seed": seed})
            out_rows.append(entry), out_defenses.append((label, api.build("defenses", entry.name, entry.options)))
            seeds.append(seed)
    return out_rows, out_defenses, seeds


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
    """Versions, the CPU kernel family PyTorch runs and its thread count (results agree across
    families and thread counts to sampling noise, not bit for bit)."""
    import open_clip

    versions = {"vlbench": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads()}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        versions["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    return versions


def checkpoint_path(base: Victim, defense: api.Defense) -> tuple[Path, dict]:
    """Where ``defense`` trained from ``base`` is cached, and the key that names it."""
    key = {"base": base.fingerprint(), "defense": defense.config(), "data": defense.training_data(),
           "precision": base.precision}
    return artifact_path("checkpoints", key, trained=True, prefix=f"{_safe(defense.name)}-", suffix=".safetensors")


def obtain_model(base: Victim, defense: api.Defense, progress: bool, label: str | None = None,
                 wait: bool = True, log_path: str = "", loading: Loading | None = None) -> tuple[Victim, dict] | None:
    """A copy of ``base`` with ``defense`` applied; trained weights are cached and reused.

    The training is claimed first, so of several processes sharing the cache one trains; the
    others wait for its checkpoint, or with ``wait=False`` get None and do other work. A
    claim's owner that dies leaves its intermediate checkpoints, and the next owner resumes
    from them."""
    found = _trained_model(base, defense, progress, label, wait, log_path, loading)
    if found is not None:
        victim = found[0]
        victim.set_undefended(base)
        defense.apply(victim)
    return found


def _trained_model(base: Victim, defense: api.Defense, progress: bool, label: str | None, wait: bool,
                   log_path: str, loading: Loading | None) -> tuple[Victim, dict] | None:
    from safetensors.torch import load_file

    if not defense.trains:
        return copy.deepcopy(base), {"trained": False}
    path, key = checkpoint_path(base, defense)

    def reuse() -> tuple[Victim, dict] | None:
        if not path.is_file():
            return None
        victim = copy.deepcopy(base)
        try:
            victim.model.load_state_dict(load_file(str(path)))
        except Exception as exc:  # a damaged checkpoint is rebuilt, not trusted
            log.warning("checkpoint %s unreadable (%s); training again", path, exc)
            return None
        victim.weights_changed()
        return victim, {"trained": True, "checkpoint": str(path), "reused": True}

    def train() -> tuple[Victim, dict]:
        victim = copy.deepcopy(base)
        # Intermediate checkpoints live beside the final one, so a killed run resumes training.
        workdir = path.with_suffix(".partial")
        every = int(os.environ.get("VLBENCH_CHECKPOINT_EVERY", "100"))
        # one line per training in the log: which process trained what, and whether it resumed
        print(f"training {label or defense.name} ({path.name}) in pid {os.getpid()}"
              + (" from its intermediate checkpoint" if any(workdir.glob("step-*")) else ""), file=sys.stderr, flush=True)
        with timing.phase(f"train {label or defense.name}"):
            summary = defense.fit(victim, TrainingRun(progress=progress, workdir=workdir, label=label,
                                                      checkpoint_every=every, loading=loading or Loading()))
        victim.requires_grad_(False)
        victim.eval()
        victim.weights_changed()
        atomic_save_tensors(path, victim.model.state_dict(),
                            metadata={"key": json.dumps(key, default=str), "summary": json.dumps(summary)})
        shutil.rmtree(workdir, ignore_errors=True)
        return victim, {"trained": True, "checkpoint": str(path), "reused": False, "fit": summary}

    found = reuse()
    if found is not None:
        return found
    claim = Claim(path.parent, path.stem, f"training {label or defense.name}", log_path)
    while not claim.take():
        if not wait:
            return None
        time.sleep(2.0)
        found = reuse()
        if found is not None:
            return found
    with claim:
        return reuse() or train()  # reuse: trained by the process we waited for


# -- the plan, as the user sees it before any work starts ---------------------------------
def _bases_of(cells: list[Cell]) -> list[ModelSpec]:
    return list({c.base.name: c.base for c in cells}.values())


def _cell_work(cell: Cell, data: EvalData, indices: list[int]) -> Work | None:
    texts, classes = tasks.get(cell.task).sizes(data, indices)
    return cell.attack.work(cell.task, len(indices), texts, classes)


def describe_plan(cfg: MatrixConfig, plan: Plan, todo: list[Cell], datasets: dict[str, EvalData],
                  rates: Rates, bases: BaseModels) -> list[str]:
    """A few lines: cells to run and done, what is built, trained or reused, and the time
    estimate from ``rates``."""
    from vlbench.monitor.progress import clock

    done = len(plan.cells) - len(todo)
    models = _bases_of(plan.cells)
    shown = ", ".join(m.name for m in models[:4]) + (f" and {len(models) - 4} more" if len(models) > 4 else "")
    lines = [f"plan: {len(plan.cells)} cells in {cfg.out} ({len(todo)} to run, {done} already done"
             + (f", {len(plan.skipped)} skipped: attack not defined for the task" if plan.skipped else "")
             + f"); {shown} on {cfg.device}, {cfg.precision}, {torch.get_num_threads()} threads"]
    builds: dict[str, Work] = dict(pending_builds(_bases_of(todo), cfg))
    plugins_used = {id(p): p for c in todo for p in (c.attack, c.defense)}.values()
    for plugin in plugins_used:
        for name, work in plugin.pending():
            builds[name] = work
    estimate, unknown = sum(rates.seconds(w) for w in builds.values()), 0
    if builds:
        lines.append("  build: " + ", ".join(f"{n} ~{clock(rates.seconds(w))}" for n, w in builds.items()))
    train, reuse = [], []
    for label, (defense, model) in {c.row: (c.defense, c.base) for c in todo}.items():
        if not defense.trains:
            continue
        if bases.ready(model) and checkpoint_path(bases.get(model), defense)[0].is_file():
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
    lines.append(f"  memory: ~{rates.attack_memory(cfg.batch_size) / 2**30:.2f} GB for an attack step at batch "
                 f"{cfg.batch_size} (weights {rates.weight_bytes / 2**30:.2f} GB, saved activations "
                 f"{rates.activation_bytes / 2**20:.1f} MB per image; on a GPU add the allocator's slack)")
    return lines


def cell_warnings(task: str, metrics: dict[str, float]) -> list[str]:
    warnings = []
    pairs = [(k, f"clean_{k}") for k in metrics if f"clean_{k}" in metrics]
    for robust, clean in pairs:
        if metrics[robust] > metrics[clean] + 1e-9:
            warnings.append(f"robust {robust} ({metrics[robust]:.2f}) above clean ({metrics[clean]:.2f}): "
                            "the attack may be broken or too weak")
    return warnings


def _cell_seed(seed: int, cell: Cell) -> int:
    # A version bump recomputes a cell with the same random draws, so its numbers move only
    # where the code changed what they mean.
    attack = without_versions(cell.config["attack"])
    return int(stable_hash({"seed": seed, "dataset": cell.dataset, "attack": attack}, 8), 16)


@dataclass
class Selection:
    """Which of a plan's unfinished cells a run takes: all (the default), a deterministic
    shard, an explicit list (a cluster task's cells), or only the cells that failed before."""

    shard: tuple[int, int] | None = None   # (index, count), index from 0
    only: list[str] | None = None           # cell ids
    retry_failed: bool = False

    def apply(self, plan: Plan, cells: list[Cell]) -> list[Cell]:
        if self.shard is not None:
            mine = set(c.id for c in shard_cells(plan.cells, *self.shard))
            cells = [c for c in cells if c.id in mine]
        if self.only is not None:
            wanted = set(self.only)
            cells = [c for c in cells if c.id in wanted]
        failed = {c.id for c in cells if failure_path(c).is_file()}
        if self.retry_failed:
            return [c for c in cells if c.id in failed]
        return [c for c in cells if c.id not in failed]


def shard_cells(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The ``index``-th of ``count`` contiguous, nearly equal slices of the plan's cells: the
    plan's order keeps a defense's cells together, so a shard loads few models; the slices
    together hold every cell exactly once."""
    n = len(cells)
    return cells[index * n // count:(index + 1) * n // count]


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (I from 0), or ``auto``: the rank and world size that torchrun or srun set."""
    if text == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in os.environ and size in os.environ:
                return parse_shard(f"{os.environ[rank]}/{os.environ[size]}")
        raise UserError("--shard auto found no RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS",
                        "launch with torchrun or srun, or pass --shard I/N")
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise UserError(f"--shard {text!r} is not I/N with 0 <= I < N", "write e.g. --shard 0/4 ... --shard 3/4")
    return int(match.group(1)), int(match.group(2))


def failure_path(cell: Cell) -> Path:
    return cell.path.parent.parent / "failed" / f"{cell.id}.json"


def claims_folder(cfg: MatrixConfig) -> Path:
    return Path(cfg.out) / "claims"


def write_manifest(cfg: MatrixConfig, plan: Plan, checkpoints: dict[str, str]) -> None:
    """The plan's cells (and where each defense's training claim lives), for ``vlbench status``;
    named by its content, so runs of the same plan share one file."""
    cells = [{"id": c.id, "defense": c.row, "attack": c.attack_label, "dataset": c.dataset}
             for c in plan.cells]
    manifest = {"cells": cells, "checkpoints": checkpoints}
    path = Path(cfg.out) / "plans" / f"{stable_hash(manifest, 12)}.json"
    if not path.is_file():
        atomic_write_json(path, manifest)


def recorded_failures(cells: list[Cell], since: float = 0.0) -> list[tuple[str, str, bool]]:
    """(cell id, error, was bad input) of each unfinished cell whose failure record is no older
    than ``since`` (a time.time()), for :func:`raise_failures`."""
    found = []
    for cell in cells:
        path = failure_path(cell)
        try:
            if is_finished(cell.path) or path.stat().st_mtime < since:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found.append((cell.id, record["error"], record["user_error"]))
    return found


class RunFailed(UserError):
    """Some cells failed; the others finished. Exit status 1 unless every failure was bad input."""

    exit_code = 1


def record_failure(cell: Cell, exc: BaseException, stage: str, log_path: str) -> None:
    import traceback

    lines = [line for line in traceback.format_exception_only(type(exc), exc)[-1].splitlines() if line.strip()]
    atomic_write_json(failure_path(cell), {
        "cell": cell.id, "defense": cell.row, "attack": cell.attack_label, "dataset": cell.dataset,
        "stage": stage, "error": lines[-1] if lines else type(exc).__name__, "user_error": isinstance(exc, UserError),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "log": log_path, "host": platform.node(), "pid": os.getpid(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })


@dataclass
class PreparedRun:
    """A checked plan and what this run takes of it, before anything is built or written."""

    cfg: MatrixConfig
    plan: Plan
    todo: list[Cell]
    datasets: dict[str, EvalData]
    bases: BaseModels
    selection: Selection

    def pending_builds(self) -> bool:
        """Whether something must be built before any cell runs (a base model's weights, such
        as the world CLIP's pretraining; a plugin's data)."""
        plugins = {id(p): p for c in self.todo for p in (c.attack, c.defense)}.values()
        return bool(pending_builds(_bases_of(self.todo), self.cfg)) or any(p.pending() for p in plugins)


def prepare_run(cfg: MatrixConfig, selection: Selection | None = None,
                report: Callable[[str], None] | None = None) -> PreparedRun:
    """Check everything (names, parameters, datasets, training data) and report the plan, with
    its time estimate; nothing is built or written yet."""
    selection = selection or Selection()
    plan = make_plan(cfg)
    for d, a, name, reason in plan.skipped:
        log.info("skip %s × %s × %s: %s", d, a, name, reason)
    todo = selection.apply(plan, plan.todo())
    # Check every dataset loads before spending compute (a missing one is bad input).
    datasets: dict[str, EvalData] = {name: load_dataset(name) for name in {c.dataset for c in todo}}
    bases = BaseModels(cfg)
    for defense, model in {id(c.defense): (c.defense, c.base) for c in todo}.values():
        # only the defenses this run will train: a cached checkpoint needs no training data
        if defense.trains and not (bases.ready(model) and checkpoint_path(bases.get(model), defense)[0].is_file()):
            defense.check_training_data()
    if report is not None:
        if todo:
            first = todo[0].base
            if bases.ready(first):
                timed = bases.get(first)
            else:  # its weights are built first: time the architecture
                torch.manual_seed(0)
                timed = architecture_victim(first, cfg.precision, cfg.models).to(cfg.device)
            rates = Rates.measure(timed, min(cfg.batch_size, 64))
            for line in describe_plan(cfg, plan, todo, datasets, rates, bases):
                report(line)
        else:
            report(f"plan: all {len(plan.cells)} cells of {cfg.out} are done"
                   + ("" if selection.retry_failed else _failed_note(plan)))
    return PreparedRun(cfg, plan, todo, datasets, bases, selection)


def build_prerequisites(run: PreparedRun) -> BaseModels:
    """Build what every cell needs first (the plugins' data, the base models' weights), clean
    up after writers that died, and record the plan for ``vlbench status``; returns the base
    models."""
    cfg = run.cfg
    for plugin in {id(p): p for c in run.todo for p in (c.attack, c.defense)}.values():
        plugin.prepare()
    out = Path(cfg.out)
    for folder in (out / "cells", out / "failed", claims_folder(cfg)):
        if folder.is_dir():
            remove_stale_temporaries(folder)  # left by a run killed mid-write
    trained = {c.row: c for c in run.plan.cells if c.defense.trains}
    for model in _bases_of(run.todo):
        run.bases.get(model)  # builds what a base needs (the world CLIP's pretraining) once, here
    write_manifest(cfg, run.plan, {label: str(checkpoint_path(run.bases.get(c.base), c.defense)[0])
                                   for label, c in trained.items() if run.bases.ready(c.base)})
    return run.bases


def run_matrix(cfg: MatrixConfig, progress: bool = True, cache: EmbeddingCache | None = None,
               report: Callable[[str], None] | None = None, selection: Selection | None = None,
               log_path: str = "", poll_seconds: float = 2.0) -> Plan:
    """Run the cells of ``cfg`` that have no result yet (those ``selection`` picks). With
    ``report``, the plan and its time estimate are reported before any work starts, and the
    time per phase at the end.

    Every cell and every defense's training is claimed first (:mod:`vlbench.store.claims`):
    cells another live process holds are left to it (and taken over if it dies), a defense
    another process trains is waited for while other work remains. A cell that fails is
    recorded in ``<out>/failed/`` and the run goes on; at the end :class:`RunFailed` names
    the failures.
    """
    started = time.perf_counter()
    timing.take()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run = prepare_run(cfg, selection, report)
    if not run.todo:
        return run.plan
    build_prerequisites(run)
    runner = _CellRunner(run, cache or EmbeddingCache(), progress, log_path, time.time())
    bar = progress_bar(total=len(run.todo), desc="cells", enabled=progress)
    groups: dict[str, list[Cell]] = {}
    for cell in run.todo:
        groups.setdefault(cell.row, []).append(cell)
    while groups:
        progressed = False
        for label in list(groups):
            groups[label] = [c for c in groups[label] if not runner.settled(c)]
            if not groups[label]:
                del groups[label]
                continue
            ran = runner.run_group(groups[label], bar)
            progressed = progressed or ran
        if groups and not progressed:
            time.sleep(poll_seconds)  # what is left is claimed by live workers: wait for them
    bar.close()
    if report is not None:
        report("time by phase:\n" + timing.summary(timing.take(), time.perf_counter() - started))
    raise_failures(cfg, [(cell.id, message, user) for cell, message, user in runner.failures], len(run.todo))
    return run.plan


def raise_failures(cfg: MatrixConfig, failures: list[tuple[str, str, bool]], total: int) -> None:
    """Raise :class:`RunFailed` (or a :class:`UserError` if every failure was bad input) naming
    the first of ``failures``: (cell id, message, was bad input)."""
    if not failures:
        return
    cell, message, _ = failures[0]
    if all(user for _, _, user in failures):
        raise UserError(f"{len(failures)} of {total} cells failed: {message}",
                        f"fix the input, then rerun with --retry-failed (vlbench status {cfg.out} lists them)")
    raise RunFailed(f"{len(failures)} of {total} cells failed (first: {cell}: {message})",
                    f"the other cells finished; see vlbench status {cfg.out}, fix, then rerun with --retry-failed")


def _failed_note(plan: Plan) -> str:
    failed = sum(failure_path(c).is_file() for c in plan.cells)
    return f" but {failed} failed (vlbench status {plan.cells[0].path.parent.parent}; --retry-failed)" if failed else ""


class _CellRunner:
    """Runs a defense's cells under claims, with one model loaded at a time."""

    def __init__(self, run: PreparedRun, cache: EmbeddingCache, progress: bool, log_path: str, started: float):
        self.cfg, self.bases, self.cache, self.datasets = run.cfg, run.bases, cache, run.datasets
        self.progress, self.log_path, self.started = progress, log_path, started
        self.revision, self.versions = code_revision(), library_versions()
        self.loading = Loading.for_device(run.cfg.data_workers, run.cfg.device)
        self.failures: list[tuple[Cell, str, bool]] = []

    def settled(self, cell: Cell) -> bool:
        """Finished, or failed during this run (here or in another worker)."""
        if is_finished(cell.path):
            return True
        try:
            return failure_path(cell).stat().st_mtime >= self.started
        except FileNotFoundError:
            return False

    def _fail(self, cell: Cell, exc: BaseException, stage: str) -> None:
        log.error("%s of %s failed: %s: %s", stage, cell.id, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, UserError))
        record_failure(cell, exc, stage, self.log_path)
        self.failures.append((cell, f"{type(exc).__name__}: {exc}", isinstance(exc, UserError)))

    def run_group(self, cells: list[Cell], bar) -> bool:
        """Run what can run now of one defense's cells; False if nothing could (its training
        or all its cells are claimed by other workers)."""
        label, defense = cells[0].row, cells[0].defense
        claims = claims_folder(self.cfg)
        if not any(_claimable(claims, c) for c in cells):
            return False
        model_started = time.perf_counter()
        try:
            base = self.bases.get(cells[0].base)
            obtained = obtain_model(base, defense, self.progress, label, wait=False, log_path=self.log_path,
                                    loading=self.loading)
        except Exception as exc:  # noqa: BLE001 - recorded per cell, the other defenses go on
            for cell in cells:
                self._fail(cell, exc, "training")
            return True
        if obtained is None:
            return False  # another worker trains it
        victim, model_info = obtained
        model_seconds = time.perf_counter() - model_started
        ctx = EvalContext(victim, self.cache, self.cfg.batch_size, self.progress, self.cfg.seed,
                          loaders=EvalLoaders(self.loading))
        ran = False
        for cell in cells:
            claim = Claim(claims, cell.id, f"cell {cell.id}", self.log_path)
            if not claim.take():
                continue
            with claim:
                if self.settled(cell):
                    continue
                ran = True
                bar.set_postfix_str(cell.id.rsplit("__", 1)[0])
                try:
                    self._run_cell(cell, ctx, victim, model_info, model_seconds)
                except Exception as exc:  # noqa: BLE001 - recorded, the other cells go on
                    self._fail(cell, exc, "evaluation")
                    continue
                failure_path(cell).unlink(missing_ok=True)
                bar.update(1)
        return ran

    def _run_cell(self, cell: Cell, ctx: EvalContext, victim: Victim, model_info: dict, model_seconds: float):
        cfg = self.cfg
        data = self.datasets[cell.dataset]
        indices = subset_indices(len(data), cfg.limit, cfg.seed)
        t0 = time.perf_counter()
        halved = []
        while True:
            generator = torch.Generator().manual_seed(_cell_seed(cfg.seed, cell))
            torch.manual_seed(_cell_seed(cfg.seed, cell))
            cell.attack.take_notes(), cell.attack.take_adjustments()
            try:
                samples: dict = {}
                metrics = evaluate(ctx, data, indices, cell.attack, generator, samples)
                break
            except torch.cuda.OutOfMemoryError:
                if ctx.batch_size <= 1:
                    raise
                # the victim's other cells keep the smaller batch: the memory pressure stays
                halved.append(f"CUDA out of memory at batch size {ctx.batch_size}: halved to {ctx.batch_size // 2}")
                log.warning("%s: %s", cell.id, halved[-1])
                ctx.batch_size //= 2
                ctx.memo = type(ctx.memo)(ctx.victim)
                torch.cuda.empty_cache()
        if ctx.batch_size != cfg.batch_size and not halved:
            halved.append(f"batch size {ctx.batch_size}, halved from {cfg.batch_size} after a CUDA out-of-memory error")
        seconds = time.perf_counter() - t0
        timing.record(f"evaluate {cell.attack_label}", seconds)
        result = {
            "schema": RESULT_SCHEMA, "cell": cell.id,
            "defense": cell.defense_label, "training_seed": cell.training_seed, "attack": cell.attack_label,
            "dataset": cell.dataset, "task": cell.task, "config": cell.config,
            "metrics": metrics, "n": len(indices), "samples": samples,
            "subset_hash": subset_hash(cell.dataset, data.spec.split, indices),
            "seed": cfg.seed, "precision": cfg.precision, "versions": self.versions,
            "code_revision": self.revision,
            "model": {"fingerprint": victim.fingerprint(), **model_info},
            "base": {"entry": cell.base.name, "fingerprint": victim.undefended.fingerprint()},
            "timings": {"evaluate_s": round(seconds, 3), "model_s": round(model_seconds, 3)},
            "warnings": cell_warnings(cell.task, metrics) + cell.attack.take_notes(),
            "adjustments": halved + cell.attack.take_adjustments(), "batch_size": ctx.batch_size,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(cell.path, result)


def _claimable(folder: Path, cell: Cell) -> bool:
    found = read_claim(Claim(folder, cell.id).path)
    return found is None or found.stale
