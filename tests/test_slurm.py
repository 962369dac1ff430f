"""The matrix on a real single-node SLURM cluster (``tests/slurm_cluster.py``) through
submitit: the staged jobs, a training job requeued mid-way that resumes from its
intermediate checkpoint, and the same cells and leaderboard as a sequential run."""

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from results_of import leaderboard_rows, metrics_by_cell, trainings
from slurm_cluster import SlurmCluster, why_unavailable


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(f"no SLURM cluster here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()



def squeue(cluster: SlurmCluster) -> dict[str, str]:
    """job name → job id of the cluster's jobs, finished ones included."""
    listed = cluster.run("squeue", "-h", "-r", "--states=all", "-o", "%i|%j").stdout.split()
    return {name: job for job, name in (line.split("|", 1) for line in listed)}


def test_jobs_requeue_with_their_arguments_and_run_in_process(tmp_path, world_checkpoint_path):
    import cloudpickle
    import submitit

    from vlbench.run.matrix import MatrixConfig, PluginSpec, make_plan
    from vlbench.run.slurm import EvalJob, groups_of

    cfg = MatrixConfig(pretrained=str(world_checkpoint_path), out=str(tmp_path / "out"), limit=20, batch_size=20,
                       defenses=[PluginSpec("none", "none")], attacks=[PluginSpec("none", "none")],
                       datasets=["world-shape", "world-colour"])
    plan = make_plan(cfg)
    (group,) = groups_of(plan.cells, "defense").values()
    ids = [c.id for c in group]
    job = cloudpickle.loads(cloudpickle.dumps(EvalJob(cfg, [], {}, True, False)))
    again = job.checkpoint(ids)
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.args == (ids,)
    assert again.function(*again.args) == "evaluated 2 cells"
    assert sorted(metrics_by_cell(cfg.out)) == sorted(ids)
    assert [len(g) for g in groups_of(plan.cells, "dataset").values()] == [1, 1]


@pytest.mark.slow
def test_the_world_matrix_on_slurm_with_a_requeued_training(tmp_path, slurm, world_checkpoint_path):
    config = tmp_path / "matrix.yaml"
    training = {"steps": 60, "batch_size": 16, "train_datasets": ["world-shape"], "lr": 1e-4}
    config.write_text(yaml.safe_dump({
        # one thread in the jobs and in the sequential reference: weights depend on the count
        "pretrained": str(world_checkpoint_path), "limit": 60, "batch_size": 60, "threads": 1,
        "defenses": ["none", {"vanilla": training}, {"tecoa": {**training, "eps": 4, "attack_steps": 2}}],
        "attacks": ["none", {"pgd": {"eps": 4, "steps": 5}}, {"bert-attack": {"mlm": "world", "budget": 1}}],
        "datasets": ["world-shape", "world-colour", "world-retrieval"],
        "executor": {"time_limit_min": 30, "array_parallelism": 4},
    }))
    cache = tmp_path / "cache"
    env = {**os.environ, **slurm.env, "VLBENCH_CACHE": str(cache), "VLBENCH_CHECKPOINT_EVERY": "5"}
    out = tmp_path / "slurm-out"
    log = tmp_path / "submit.log"
    with open(log, "w") as handle:
        submitter = subprocess.Popen([sys.executable, "-m", "vlbench.cli", "run", "matrix", "--config", str(config),
                                      "--out", str(out), "--no-progress", "--executor", "slurm"],
                                     stdout=handle, stderr=subprocess.STDOUT, env=env, text=True)
    # requeue tecoa's training job once it has written an intermediate checkpoint
    requeued = None
    deadline = time.time() + 600
    while requeued is None and time.time() < deadline and submitter.poll() is None:
        partial = list((cache / "checkpoints").glob("tecoa-*.partial/step-*.safetensors"))
        job = squeue(slurm).get("vlbench-train-tecoa")
        if partial and job:
            done = slurm.run("scontrol", "requeue", job)
            assert done.returncode == 0, done.stderr
            requeued = job
        time.sleep(0.1)
    assert requeued is not None, log.read_text()[-3000:]
    assert submitter.wait(timeout=1200) == 0, log.read_text()[-3000:]
    printed = log.read_text()
    # nothing to build first: the world CLIP and its masked LM ship with the package
    assert "submitted 6 SLURM jobs (2 training, 3 evaluation tasks in 3 arrays, 1 leaderboard)" in printed

    job_logs = "".join(p.read_text() for p in sorted((out / "logs" / "slurm").rglob("*_log.*")))
    assert trainings(job_logs, "tecoa") == 2 and "from its intermediate checkpoint" in job_logs
    assert trainings(job_logs, "vanilla") == 1

    reference = tmp_path / "sequential"
    seq_env = {**os.environ, "VLBENCH_CACHE": str(tmp_path / "cache-seq")}
    done = subprocess.run([sys.executable, "-m", "vlbench.cli", "run", "matrix", "--config", str(config),
                           "--out", str(reference), "--no-progress"], capture_output=True, text=True, env=seq_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics_by_cell(out) == metrics_by_cell(reference) and len(metrics_by_cell(out)) == 27
    assert leaderboard_rows(out) == leaderboard_rows(reference)

    from safetensors.torch import load_file

    (resumed,) = (cache / "checkpoints").glob("tecoa-*.safetensors")
    uninterrupted = load_file(str(tmp_path / "cache-seq" / "checkpoints" / resumed.name))
    assert all(torch.equal(v, uninterrupted[k]) for k, v in load_file(str(resumed)).items())

    status = subprocess.run([sys.executable, "-m", "vlbench.cli", "status", str(out)], capture_output=True,
                            text=True, env=env)
    assert status.returncode == 0 and "27 cells: 27 done" in status.stdout
