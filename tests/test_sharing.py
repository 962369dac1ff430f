"""Many writers on one results folder: shards, worker processes, processes killed mid-cell,
failed cells recorded and retried, and ``vlbench status``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from results_of import leaderboard_rows, metrics_by_cell, trainings
from vlbench import api
from vlbench.cli import main
from vlbench.run.matrix import (MatrixConfig, PluginSpec, RunFailed, Selection, make_plan, parse_shard, run_matrix,
                                shard_cells)
from vlbench.run.status import read_status
from vlbench.store.claims import read_claim

TRAINING = {"steps": 12, "batch_size": 8, "train_datasets": ["world-shape"], "lr": 1e-4}


def small_config(out, checkpoint, **overrides) -> MatrixConfig:
    values = dict(pretrained=str(checkpoint), out=str(out), limit=40, batch_size=40,
                  defenses=[PluginSpec("none", "none"), PluginSpec("vanilla", "vanilla", dict(TRAINING))],
                  attacks=[PluginSpec("none", "none"), PluginSpec("pgd", "pgd", {"eps": 4, "steps": 2})],
                  datasets=["world-shape", "world-colour", "world-retrieval"])
    values.update(overrides)
    return MatrixConfig(**values)



def leftovers(out) -> list[str]:
    """Temporary files and claims left in a results folder (and the defense checkpoints')."""
    return [str(p) for p in Path(out).rglob("*") if p.name.endswith((".tmp", ".claim"))]


# -- shards -------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 5, 7])
def test_shards_partition_the_plan(tmp_path, world_checkpoint_path, count):
    plan = make_plan(small_config(tmp_path / "out", world_checkpoint_path))
    shards = [shard_cells(plan.cells, i, count) for i in range(count)]
    ids = [c.id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.id for c in plan.cells) and len(ids) == len(set(ids))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    again = make_plan(small_config(tmp_path / "out", world_checkpoint_path))
    assert [c.id for c in shard_cells(again.cells, 0, count)] == [c.id for c in shards[0]]  # deterministic


def test_shard_runs_cover_every_cell_once(tmp_path, world_checkpoint_path):
    cfg = small_config(tmp_path / "out", world_checkpoint_path, defenses=[PluginSpec("none", "none")])
    done = []
    for index in range(3):
        before = set(metrics_by_cell(cfg.out))
        run_matrix(cfg, progress=False, selection=Selection(shard=(index, 3)))
        done.append(set(metrics_by_cell(cfg.out)) - before)
    expected = {c.id for c in make_plan(cfg).cells}
    assert set().union(*done) == expected and sum(map(len, done)) == len(expected)
    assert all(done)


@pytest.mark.parametrize("text, expected", [("0/4", (0, 4)), ("3/4", (3, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "1", "a/b", "2/0"])
def test_bad_shard_is_one_line(tmp_path, capsys, text):
    assert main(["run", "matrix", f"--shard={text}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--shard" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_shard_auto_reads_torchrun_and_srun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert parse_shard("auto") == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard("auto") == (1, 4)


# -- failures, status, retry ----------------------------------------------------------------
def test_a_failed_cell_is_recorded_shown_and_retried(tmp_path, world_checkpoint_path, monkeypatch, capsys):
    cfg = small_config(tmp_path / "out", world_checkpoint_path, defenses=[PluginSpec("none", "none")])
    pgd = api.attacks.get("pgd")
    original = pgd.perturb_images

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pgd, "perturb_images", broken)
    with pytest.raises(RunFailed, match="cells failed .*illegal memory access") as failed:
        run_matrix(cfg, progress=False)
    assert failed.value.exit_code == 1
    cells, _ = read_status(cfg.out)
    states = {(c.attack, c.dataset): c.state for c in cells}
    assert {k for k, v in states.items() if v == "failed"} == {("pgd", "world-shape"), ("pgd", "world-colour"),
                                                             ("pgd", "world-retrieval")}
    assert {v for k, v in states.items() if k[0] == "none"} == {"done"}
    assert main(["status", cfg.out]) == 0
    shown = capsys.readouterr().out
    assert "3 done" in shown and "3 failed" in shown and "RuntimeError: CUDA error: an illegal memory access" in shown
    assert "traceback in" in shown and "--retry-failed" in shown

    before = metrics_by_cell(cfg.out)
    assert run_matrix(cfg, progress=False)  # a plain rerun leaves the failed cells alone
    assert metrics_by_cell(cfg.out) == before
    monkeypatch.setattr(pgd, "perturb_images", original)
    run_matrix(cfg, progress=False, selection=Selection(retry_failed=True))
    cells, _ = read_status(cfg.out)
    assert {c.state for c in cells} == {"done"} and not list((Path(cfg.out) / "failed").glob("*.json"))


def test_status_of_a_folder_without_a_plan_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no plan" in err and "\n" not in err


# -- several processes ------------------------------------------------------------------------
def write_config(path: Path, checkpoint, out: Path, **overrides) -> Path:
    raw = {"pretrained": str(checkpoint), "out": str(out), "limit": 100, "batch_size": 50,
           "defenses": ["none", {"vanilla": TRAINING}, {"tecoa": {**TRAINING, "eps": 4, "attack_steps": 1}}],
           "attacks": ["none", {"pgd": {"eps": 4, "steps": 10}}],
           "datasets": ["world-shape", "world-colour", "world-size"], **overrides}
    path.write_text(yaml.safe_dump(raw))
    return path


def vlbench(*args, log: Path | None = None, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "vlbench.cli", *args]
    handle = open(log, "w") if log else subprocess.PIPE
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    if not wait:
        return process
    out, _ = process.communicate()
    return process.returncode, out


@pytest.mark.slow
def test_workers_give_the_cells_of_a_sequential_run(tmp_path, world_checkpoint_path):
    config = write_config(tmp_path / "matrix.yaml", world_checkpoint_path, tmp_path / "seq")
    # each of two workers on two cores runs one thread; weights depend on the count
    code, out = vlbench("run", "matrix", "--config", str(config), "--no-progress", "--threads", "1")
    assert code == 0, out
    code, out = vlbench("run", "matrix", "--config", str(config), "--no-progress", "--workers", "2",
                        "--out", str(tmp_path / "two"), env={"VLBENCH_CACHE": str(tmp_path / "cache")})
    assert code == 0, out
    assert "2 workers started (1 thread each" in out
    logs = "".join(p.read_text() for p in (tmp_path / "two" / "logs").glob("worker-*.log"))
    assert trainings(logs, "vanilla") == 1 and trainings(logs, "tecoa") == 1
    assert metrics_by_cell(tmp_path / "two") == metrics_by_cell(tmp_path / "seq")
    assert leaderboard_rows(tmp_path / "two") == leaderboard_rows(tmp_path / "seq")
    assert not leftovers(tmp_path / "two")


@pytest.mark.slow
def test_three_writers_one_killed_mid_cell(tmp_path, world_checkpoint_path):
    out = tmp_path / "shared"
    config = write_config(tmp_path / "matrix.yaml", world_checkpoint_path, out)
    env = {"VLBENCH_CACHE": str(tmp_path / "cache")}
    logs = [tmp_path / f"writer-{i}.log" for i in range(3)]
    writers = [vlbench("run", "matrix", "--config", str(config), "--no-progress", log=log, env=env, wait=False)
               for log in logs]
    pids = {w.pid: w for w in writers}
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:
        # kill a writer while it holds the claim on a cell, after some cells are finished
        if len(list((out / "cells").glob("*.json"))) >= 2:
            for claim in (out / "claims").glob("*.claim"):
                state = read_claim(claim)
                if state and state.owner and state.owner.pid in pids and not state.stale:
                    victim = pids[state.owner.pid]
                    victim.send_signal(signal.SIGKILL)
                    break
        time.sleep(0.02)
    assert victim is not None, "no writer was seen holding a cell"
    for writer in writers:
        writer.wait(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    assert all(w.returncode == 0 for w in writers if w is not victim), [log.read_text()[-2000:] for log in logs]

    planned = json.loads(next((out / "plans").glob("*.json")).read_text())["cells"]
    files = sorted((out / "cells").glob("*.json"))
    assert sorted(p.stem for p in files) == sorted(c["id"] for c in planned)  # every cell, exactly once
    assert not leftovers(out) and not leftovers(tmp_path / "cache"), leftovers(out) + leftovers(tmp_path / "cache")
    text = "".join(log.read_text() for log in logs)
    assert trainings(text, "vanilla") == 1 and trainings(text, "tecoa") == 1, text

    code, printed = vlbench("run", "matrix", "--config", str(config), "--no-progress", "--out", str(tmp_path / "seq"),
                            env={"VLBENCH_CACHE": str(tmp_path / "cache-seq")})
    assert code == 0, printed
    assert metrics_by_cell(out) == metrics_by_cell(tmp_path / "seq")
    assert leaderboard_rows(out) == leaderboard_rows(tmp_path / "seq")
