"""``--executor slurm``: the matrix as SLURM jobs, submitted with submitit.

The stages follow the data:

1. a *prepare* job, only if something must be built first (a base model built on first use, a
   plugin's data such as N:N's augmentation bank);
2. one *training* job per defense that needs training, deduplicated by checkpoint key, after
   the prepare job;
3. the *evaluation*, one job array per defense, after that defense's training: each task takes
   the cells of one defense (``group_by: defense``) or of one defense and dataset
   (``group_by: dataset``), so it loads one model and reuses its embedding and classifier
   caches across its cells;
4. one *leaderboard* job after all the others, whatever their outcome.

Every job is a ``submitit.helpers.Checkpointable``: at its time limit (or on preemption, where
the cluster sends the signal) it is requeued, up to ``max_requeues`` times. A training job
resumes from its last intermediate checkpoint and ends with the weights of an uninterrupted
run; an evaluation task keeps the cells it finished (each is written the moment it is done)
and runs only the rest. Requeueing by hand (``scontrol requeue``) does the same. The jobs use
the claims of :mod:`vlbench.store.claims` like any other writer, so a slurm run can share
its results folder with local runs and shards.

A failed job's dependants are cancelled by SLURM (``--kill-on-invalid-dep=yes``); its cells
are recorded as failed, with the job's log, for ``vlbench status`` and ``--retry-failed``.
Job logs go to ``<out>/logs/slurm/<submission>/``, one folder per submission (SLURM job ids
restart on a new cluster, and submitit would read an old job's result from a reused folder).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any, Callable

import submitit
import torch

from vlbench.data.loading import Loading
from vlbench.errors import UserError
from vlbench.run.matrix import (Cell, ExecutorConfig, MatrixConfig, Plan, PreparedRun, Selection, failure_path,
                                is_finished, prepare_run, raise_failures, record_failure, recorded_failures)


class _Job(submitit.helpers.Checkpointable):
    """What every job does first in its own process: load the run's plugins and data roots."""

    def __init__(self, cfg: MatrixConfig, plugin_files: list[str], roots: dict[str, str], cache_enabled: bool,
                 retry_failed: bool):
        self.cfg, self.plugin_files, self.roots = cfg, plugin_files, roots
        self.cache_enabled, self.retry_failed = cache_enabled, retry_failed

    def _setup(self) -> str:
        import logging

        from vlbench import plugins
        from vlbench.data import datasets

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # as many threads as the job was given CPUs: more would oversubscribe the node, where
        # spinning OpenMP threads of concurrent jobs slow each other down many times over
        torch.set_num_threads(self.cfg.threads or int(os.environ.get("SLURM_CPUS_ON_NODE", "1")))
        plugins.load_files(self.plugin_files)
        datasets.root_overrides.update({k: Path(v) for k, v in self.roots.items()})
        try:
            return str(submitit.JobEnvironment().paths.stdout)
        except RuntimeError:  # not inside a submitit job (called directly, e.g. in a test)
            return ""

    def checkpoint(self, *args: Any, **kwargs: Any):
        # requeue with the same arguments: finished work is on disk, not in the pickle
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class PrepareJob(_Job):
    def __call__(self) -> str:
        from vlbench.run.matrix import build_prerequisites

        log_path = self._setup()
        run = prepare_run(self.cfg, Selection(retry_failed=self.retry_failed))
        try:
            build_prerequisites(run)
        except Exception as exc:
            for cell in run.todo:
                record_failure(cell, exc, "prepare", log_path)
            raise
        return "prepared"


class TrainJob(_Job):
    def __call__(self, cell_ids: list[str]) -> str:
        from vlbench.run.matrix import build_prerequisites, obtain_model

        log_path = self._setup()
        run = prepare_run(self.cfg, Selection(only=cell_ids, retry_failed=self.retry_failed))
        if not run.todo:
            return "nothing to train"
        cell = run.todo[0]
        try:
            bases = build_prerequisites(run)
            obtain_model(bases.get(cell.base), cell.defense, False, cell.row, wait=True, log_path=log_path,
                         loading=Loading.for_device(self.cfg.data_workers, self.cfg.device))
        except Exception as exc:
            for other in run.todo:
                record_failure(other, exc, "training", log_path)
            raise
        return f"trained {cell.row}"


class EvalJob(_Job):
    def __call__(self, cell_ids: list[str]) -> str:
        from vlbench.run.matrix import run_matrix
        from vlbench.store.embeddings import EmbeddingCache

        log_path = self._setup()
        run_matrix(self.cfg, progress=False, cache=EmbeddingCache(enabled=self.cache_enabled),
                   selection=Selection(only=cell_ids, retry_failed=self.retry_failed), log_path=log_path)
        return f"evaluated {len(cell_ids)} cells"


class LeaderboardJob(_Job):
    def __call__(self) -> str:
        from vlbench.reporting.leaderboard import write_leaderboard

        self._setup()
        write_leaderboard(self.cfg.out)
        return "leaderboard written"


def groups_of(cells: list[Cell], group_by: str) -> dict[tuple[str, ...], list[Cell]]:
    """The evaluation tasks: cells sharing a model (and, with ``dataset``, a dataset)."""
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for cell in cells:
        key = (cell.row,) if group_by == "defense" else (cell.row, cell.dataset)
        groups.setdefault(key, []).append(cell)
    return groups


def _array_id(job_id: str) -> str:
    return job_id.split("_")[0]


def run_on_slurm(cfg: MatrixConfig, report: Callable[[str], None], selection: Selection | None = None,
                 plugin_files: list[str] | None = None, roots: dict[str, str] | None = None,
                 cache_enabled: bool = True, wait: bool = True, poll_seconds: float = 10.0) -> Plan:
    """Submit the plan's missing cells as SLURM jobs; with ``wait``, follow them to the end."""
    cfg = MatrixConfig(**{**vars(cfg), "out": str(Path(cfg.out).resolve())})
    run = prepare_run(cfg, selection, report)
    if not run.todo:
        return run.plan
    ecfg: ExecutorConfig = cfg.executor
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.out) / "logs" / "slurm" / f"{stamp}-{os.getpid()}"
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=ecfg.max_requeues)
    sbatch = {"kill-on-invalid-dep": "yes", **{str(k): v for k, v in ecfg.sbatch.items()}}
    common: dict[str, Any] = dict(time=ecfg.time_limit_min, array_parallelism=ecfg.array_parallelism,
                                  signal_delay_s=ecfg.signal_delay_s, additional_parameters=sbatch)
    if ecfg.partition:
        common["partition"] = ecfg.partition
    if ecfg.gpus_per_task:
        common["gpus_per_node"] = ecfg.gpus_per_task
    if ecfg.cpus_per_task:
        common["cpus_per_task"] = ecfg.cpus_per_task
    if ecfg.mem_gb:
        common["mem"] = f"{int(ecfg.mem_gb * 1024)}M"
    args = (cfg, list(plugin_files or []), dict(roots or {}), cache_enabled, run.selection.retry_failed)

    def submit(job_class: type, name: str, after: list[str], *call_args: Any, kind: str = "afterok"):
        executor.update_parameters(**common, job_name=f"vlbench-{name}",
                                   dependency=f"{kind}:" + ":".join(after) if after else None)
        return executor.submit(job_class(*args), *call_args)

    jobs: dict[str, Any] = {}
    prepare = submit(PrepareJob, "prepare", []) if run.pending_builds() else None
    if prepare is not None:
        jobs["prepare"] = prepare
    first = [prepare.job_id] if prepare is not None else []
    training = _trainings(run)
    train_jobs: dict[str, Any] = {}
    for key, labels in training.items():
        cells = [c.id for c in run.todo if c.row in labels]
        job = submit(TrainJob, f"train-{labels[0]}", first, cells)
        jobs[f"train {labels[0]}"] = job
        for label in labels:
            train_jobs[label] = job
    eval_jobs = []
    by_defense: dict[str, list[list[Cell]]] = {}
    for key, cells in groups_of(run.todo, ecfg.group_by).items():
        by_defense.setdefault(key[0], []).append(cells)
    for label, groups in by_defense.items():
        after = first + ([train_jobs[label].job_id] if label in train_jobs else [])
        executor.update_parameters(**common, job_name=f"vlbench-eval-{label}",
                                   dependency="afterok:" + ":".join(after) if after else None)
        job_class = EvalJob
        with executor.batch():
            array = [executor.submit(job_class(*args), [c.id for c in cells]) for cells in groups]
        for index, job in enumerate(array):
            jobs[f"evaluate {label} #{index}"] = job
        eval_jobs.extend(zip(array, groups))
    ends = sorted({_array_id(j.job_id) for j in jobs.values()})
    jobs["leaderboard"] = submit(LeaderboardJob, "leaderboard", ends, kind="afterany")
    report(f"submitted {len(jobs)} SLURM jobs ({'1 prepare, ' if prepare else ''}{len(training)} training, "
           f"{len(eval_jobs)} evaluation tasks in {len(by_defense)} arrays, 1 leaderboard); logs in {folder}")
    if not wait:
        report(f"not waiting: follow with vlbench status {cfg.out}")
        return run.plan
    started = time.time()
    while not all(job.done() for job in jobs.values()):
        time.sleep(poll_seconds)
        done = sum(is_finished(c.path) for c in run.todo)
        report(f"{done}/{len(run.todo)} cells done, {sum(j.done() for j in jobs.values())}/{len(jobs)} jobs ended "
               f"({time.time() - started:.0f} s)")
    for job, cells in eval_jobs:
        # a task killed from outside (out of memory, a lost node) recorded nothing itself
        if job.state != "COMPLETED":
            for cell in cells:
                if not is_finished(cell.path) and not failure_path(cell).is_file():
                    record_failure(cell, RuntimeError(f"SLURM job {job.job_id} ended {job.state}"), "evaluation",
                                   str(job.paths.stderr))
    _raise_for_failed(cfg, run, jobs)
    return run.plan


def _trainings(run: PreparedRun) -> dict[str, list[str]]:
    """The training jobs: checkpoint key → the defense labels that share it."""
    from vlbench.run.matrix import checkpoint_path
    from vlbench.store.files import stable_hash

    keys: dict[str, list[str]] = {}
    for label, (defense, model) in {c.row: (c.defense, c.base) for c in run.todo}.items():
        if not defense.trains:
            continue
        if run.bases.ready(model):
            path = checkpoint_path(run.bases.get(model), defense)[0]
            if path.is_file():
                continue
            key = str(path)
        else:  # the base is built by the prepare job
            key = stable_hash({"defense": defense.config(), "data": defense.training_data(), "base": model.name})
        keys.setdefault(key, []).append(label)
    return keys


def _raise_for_failed(cfg: MatrixConfig, run: PreparedRun, jobs: dict[str, Any]) -> None:
    raise_failures(cfg, recorded_failures(run.todo), len(run.todo))
    broken = [(name, job) for name, job in jobs.items() if job.state not in ("COMPLETED",)]
    unfinished = [c for c in run.todo if not is_finished(c.path)]
    if unfinished:
        detail = "; ".join(f"{name}: {job.state} (log {job.paths.stdout})" for name, job in broken[:3])
        raise UserError(f"{len(unfinished)} cells unfinished after every job ended ({detail or 'no job failed'})",
                        f"see vlbench status {cfg.out}; rerun to resume")
