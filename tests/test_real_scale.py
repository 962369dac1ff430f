"""The real-scale data path: DataLoader batches equal to the in-process ones with any number of
workers (training order and resume included), one worker pool per task, a CUDA out-of-memory
error that halves the batch, and ViT-B-32 on real-format files, sequential and in workers."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fixtures_formats import write_cifar10, write_karpathy
from results_of import leaderboard_rows, metrics_by_cell
from vlbench.data.datasets import load_dataset
from vlbench.data.loading import EvalLoaders, Loading
from vlbench.run.matrix import MatrixConfig, PluginSpec, run_matrix
from vlbench.training.batches import TrainingBatches


def batches(victim, loading, first=0, count=6):
    source = TrainingBatches(victim, ["world-shape", "world-retrieval"], "test", 4, 3,
                             tasks=("classification", "retrieval"), loading=loading)
    return [source.batch(step) for step in range(first, first + count)]


def same(a, b) -> bool:
    return (torch.equal(a.images, b.images) and a.captions == b.captions
            and (a.labels is None) == (b.labels is None) and (a.labels is None or torch.equal(a.labels, b.labels)))


def test_training_batches_do_not_depend_on_loader_workers_or_resume(tiny_victim):
    plain = batches(tiny_victim, Loading(workers=0))
    assert all(same(a, b) for a, b in zip(plain, batches(tiny_victim, Loading(workers=2))))
    assert all(same(a, b) for a, b in zip(plain[3:], batches(tiny_victim, Loading(workers=2), first=3, count=3)))
    assert plain[1].captions is not None and plain[0].labels is not None


def test_evaluation_loaders_keep_one_worker_pool_per_subset():
    data = load_dataset("world-colour")
    rows = list(range(5, 45))
    pooled = EvalLoaders(Loading(workers=1))
    first = list(pooled.batches(data.images, rows, 16))
    loader = next(iter(pooled._loaders.values()))
    workers = loader._iterator._workers if loader._iterator is not None else None
    second = list(pooled.batches(data.images, rows, 16))
    assert len(pooled._loaders) == 1 and workers and loader._iterator._workers == workers  # the same processes
    plain = list(EvalLoaders().batches(data.images, rows, 16))
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) and torch.equal(b[0], c[0])
    assert [len(t) for _, t in plain] == [16, 16, 8]


def test_a_cuda_out_of_memory_error_halves_the_batch(tmp_path, world_checkpoint_path, monkeypatch):
    import vlbench.run.matrix as matrix

    real, calls = matrix.evaluate, []

    def evaluate(ctx, *args):
        calls.append(ctx.batch_size)
        if ctx.batch_size > 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ctx, *args)

    monkeypatch.setattr(matrix, "evaluate", evaluate)
    cfg = MatrixConfig(pretrained=str(world_checkpoint_path), out=str(tmp_path / "out"), limit=40, batch_size=40,
                       defenses=[PluginSpec("none", "none")], attacks=[PluginSpec("pgd", "pgd", {"steps": 2})],
                       datasets=["world-shape", "world-colour"])
    run_matrix(cfg, progress=False)
    cells = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "cells").glob("*.json"))]
    assert calls == [40, 20, 20]
    halved = [c for c in cells if any("halved to 20" in a for a in c["adjustments"])]
    kept = [c for c in cells if any("halved from 40" in a for a in c["adjustments"])]
    assert len(halved) == 1 and len(kept) == 1 and all(c["batch_size"] == 20 for c in cells)

    monkeypatch.setattr(matrix, "evaluate", real)
    reference = MatrixConfig(**{**vars(cfg), "out": str(tmp_path / "ref"), "batch_size": 20})
    run_matrix(reference, progress=False)
    by_dataset = {c["dataset"]: c["metrics"] for c in cells}
    assert by_dataset == {json.loads(p.read_text())["dataset"]: json.loads(p.read_text())["metrics"]
                          for p in (tmp_path / "ref" / "cells").glob("*.json")}


@pytest.mark.slow
def test_vit_b_32_on_real_formats_sequential_and_in_workers(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    checkpoint = tmp_path / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cifar = write_cifar10(tmp_path / "data" / "cifar-10-batches-py", [i % 10 for i in range(12)], names,
                          train_batches=5)
    entries = [{"filename": f"{i}.jpg", "split": "test", "sentences": [f"a photo number {i}", f"picture {i}"]}
               for i in range(10)]
    flickr = write_karpathy(tmp_path / "data" / "flickr30k", "dataset_flickr30k.json", entries,
                            image_dir="flickr30k-images")
    training = {"steps": 2, "batch_size": 4, "train_datasets": ["cifar10"], "warmup": 0, "lr": 1e-5}
    config = tmp_path / "vit.yaml"
    config.write_text(yaml.safe_dump({
        "model": "ViT-B-32", "pretrained": str(checkpoint), "limit": 8, "batch_size": 8,
        "defenses": ["none", {"tecoa": {**training, "eps": 1, "attack_steps": 1}},
                     {"fare": {**training, "eps": 1, "attack_steps": 1}}],
        "attacks": ["none", {"pgd": {"eps": 1, "steps": 2}}, {"apgd-ce": {"eps": 1, "iterations": 3}}],
        "datasets": ["cifar10", "flickr30k"],
    }))
    runs = {}
    # one thread each: two workers on two cores get one, and weights depend on the count
    for name, extra in (("sequential", ["--threads", "1"]), ("workers", ["--workers", "2", "--data-workers", "1"])):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "vlbench.cli", "run", "matrix", "--config", str(config),
                               "--out", str(out), "--no-progress", "--dataset-root", f"cifar10={cifar}",
                               "--dataset-root", f"flickr30k={flickr}", *extra],
                              capture_output=True, text=True,
                              env={**os.environ, "VLBENCH_CACHE": str(tmp_path / f"cache-{name}")})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out
    cells = metrics_by_cell(runs["sequential"])
    assert len(cells) == 3 * 3 * 2 - 3  # apgd-ce is not defined for retrieval
    assert cells == metrics_by_cell(runs["workers"])
    assert leaderboard_rows(runs["sequential"]) == leaderboard_rows(runs["workers"])
