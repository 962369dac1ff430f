"""``--executor local --workers N``: the matrix in N worker processes on one machine.

The parent checks and reports the plan, builds what every cell needs (the world CLIP's
pretraining, the plugins' data), then starts N workers. Each worker runs the same plan on
the same results folder; the claims of :mod:`vlbench.store.claims` hand out the work, so a
worker trains a defense nobody else is training, evaluates the cells nobody else holds,
and keeps its model and embedding caches across the cells of a defense. A worker that dies
loses at most the cell it held, which another worker takes over.

Why not submitit's ``LocalExecutor``: it starts every submitted job at once, with neither
dependencies nor a cap on how many run, and each job is a fresh process that reloads its
model. N long-lived workers claiming work give the same stages (training before its cells,
the leaderboard last) with a bounded number of processes.

Each worker gets ``1/N`` of the CPU threads (``threads:`` sets them) and, where there are
GPUs, one GPU (``CUDA_VISIBLE_DEVICES``); it logs to ``<out>/logs/worker-<i>.log``. A worker's
thread count is recorded in its cells: trained weights depend on it in their last bits, so a
sequential run reproduces a worker run's cells bit for bit at the same ``--threads``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from vlbench.errors import UserError
from vlbench.run.matrix import (MatrixConfig, Plan, Selection, build_prerequisites, is_finished, prepare_run,
                                raise_failures, recorded_failures)


def _worker(cfg: MatrixConfig, index: int, threads: int, log_path: str, selection: Selection,
            plugin_files: list[str], roots: dict[str, str], cache_enabled: bool) -> None:
    import logging

    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    from vlbench import plugins
    from vlbench.data import datasets
    from vlbench.run.matrix import RunFailed, run_matrix
    from vlbench.store.embeddings import EmbeddingCache

    plugins.load_files(plugin_files)
    datasets.root_overrides.update({k: Path(v) for k, v in roots.items()})
    print(f"worker {index} (pid {os.getpid()}, {threads} threads) on {cfg.out}", flush=True)
    try:
        run_matrix(cfg, progress=False, cache=EmbeddingCache(enabled=cache_enabled), selection=selection,
                   log_path=log_path)
    except UserError as exc:  # recorded per cell already; the parent reports them
        print(f"worker {index}: {exc}", flush=True)
        sys.exit(1 if isinstance(exc, RunFailed) else 2)
    print(f"worker {index}: done", flush=True)


def run_workers(cfg: MatrixConfig, workers: int, report: Callable[[str], None], selection: Selection | None = None,
                plugin_files: list[str] | None = None, roots: dict[str, str] | None = None,
                cache_enabled: bool = True, poll_seconds: float = 10.0) -> Plan:
    """Run ``cfg`` in ``workers`` processes; returns the plan once they have all ended."""
    started = time.time()
    run = prepare_run(cfg, selection, report)
    if not run.todo:
        return run.plan
    build_prerequisites(run)
    logs = Path(cfg.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if cfg.device.startswith("cuda") else 0
    threads = cfg.threads or max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(workers):
        worker_cfg = cfg
        if gpus:
            # the child sees one GPU, as device 0
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
            worker_cfg = MatrixConfig(**{**vars(cfg), "device": "cuda"})
        log_path = str((logs / f"worker-{index}.log").resolve())
        process = context.Process(target=_worker, name=f"vlbench-worker-{index}", daemon=False,
                                  args=(worker_cfg, index, threads, log_path, run.selection,
                                        list(plugin_files or []), dict(roots or {}), cache_enabled))
        process.start()
        processes.append(process)
    if gpus:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    report(f"{workers} workers started ({threads} thread{'s' if threads > 1 else ''} each{', one GPU each' if gpus else ''}); "
           f"logs in {logs}")
    try:
        while any(p.is_alive() for p in processes):
            for p in processes:
                p.join(timeout=poll_seconds / len(processes))
            done = sum(is_finished(c.path) for c in run.todo)
            report(f"{done}/{len(run.todo)} cells done")
    except KeyboardInterrupt:
        for p in processes:
            p.terminate()
        raise
    raise_failures(cfg, recorded_failures(run.todo, since=started), len(run.todo))
    unfinished = [c for c in run.todo if not is_finished(c.path)]
    if unfinished:
        codes = ", ".join(str(p.exitcode) for p in processes)
        raise UserError(f"{len(unfinished)} cells unfinished after every worker ended (exit codes {codes})",
                        f"see the logs in {logs}; rerun to resume")
    return run.plan
