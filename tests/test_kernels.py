"""The default matrix from a cold cache, end to end, as the README's main command runs it:
a rerun that finds every cell done, the same undefended cells with another CPU kernel family
on the shipped world CLIP, and a rebuild of that CLIP reaching its quality bar.

PyTorch picks its kernels by CPU (``torch.backends.cpu.get_cpu_capability()``; oneDNN its
own). The tests force the next family down (AVX-512 → AVX2, AVX2 → no vectorisation,
through ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``) and check that the world
pretraining reaches its targets and the same metrics (within 1 point), and that the default
matrix evaluated with those kernels on the same trained models gives no leaderboard cell a
significantly different outcome (and the cells agree to a quarter point on average).
Models trained under the two families do not end with the same weights (floating-point
sums differ in their last bits and training amplifies that), so cells of two complete runs
differ like two training seeds; the README quotes those figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FORCED = {"AVX512": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
          "AVX2": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}}


def forced_family() -> dict[str, str]:
    return FORCED["AVX512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "AVX2"]


def vlbench(*args: str, cache: Path, env: dict[str, str] | None = None) -> float:
    """Run the command line in a subprocess with its own cache; returns the wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlbench", *args], cwd=ROOT, check=True, capture_output=True, text=True,
                   env={**os.environ, "VLBENCH_CACHE": str(cache), **(env or {})})
    return time.perf_counter() - started


def pretraining_report(cache: Path) -> dict:
    (sidecar,) = (cache / "world").glob("vlbench-world-*.json")
    return json.loads(sidecar.read_text())


def pretraining_metrics(cache: Path) -> dict[str, float]:
    return pretraining_report(cache)["metrics"]


def cells(out: Path) -> dict[tuple[str, str, str, str], tuple]:
    """(defense, attack, dataset, metric) → (headline value, per-sample 0/1 outcomes)."""
    from vlbench.evaluation.tasks import PRIMARY_METRICS
    from vlbench.reporting.statistics import outcomes

    values = {}
    for path in (out / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        for metric in PRIMARY_METRICS[cell["task"]]:
            values[(cell["defense"], cell["attack"], cell["dataset"], metric)] = (cell["metrics"][metric],
                                                                               outcomes(cell, metric))
    return values


def headline(out: Path) -> dict[tuple[str, str, str, str], float]:
    return {key: value for key, (value, _) in cells(out).items()}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The README's main command from an empty cache, with this machine's kernels."""
    home = tmp_path_factory.mktemp("native")
    seconds = vlbench("run", "matrix", "--out", str(home / "out"), "--no-progress", cache=home / "cache")
    return home, seconds


@pytest.mark.slow
def test_every_adversarial_defense_raises_robustness_on_the_world(native):
    """What the defenses promise, on the default matrix: each adversarial fine-tuning keeps
    clean accuracy within a few points of the base model and lifts PGD robustness well above
    vanilla fine-tuning's (README: at least +18 points of mean top-1, +27 of R@1)."""
    home, _ = native
    cells = headline(home / "out")
    classification = sorted({d for (_, _, d, m) in cells if m == "top1"})
    assert len(classification) == 5

    def mean_top1(defense, attack):
        return sum(cells[(defense, attack, d, "top1")] for d in classification) / len(classification)

    for defense in ("tecoa", "fare", "mmcoa", "mat", "nn"):
        assert mean_top1(defense, "none") >= mean_top1("none", "none") - 6, defense
        assert mean_top1(defense, "pgd") >= mean_top1("vanilla", "pgd") + 10, defense
        robust = cells[(defense, "pgd", "world-retrieval", "i2t_R@1")]
        assert robust >= cells[("vanilla", "pgd", "world-retrieval", "i2t_R@1")] + 20, defense


@pytest.mark.slow
@pytest.mark.benchmark(group="matrix")
def test_a_rerun_of_the_default_matrix_finds_every_cell(benchmark, native):
    home, first = native
    benchmark.pedantic(lambda: vlbench("run", "matrix", "--out", str(home / "out"), "--no-progress",
                                       cache=home / "cache"), rounds=2, iterations=1)
    ratio = benchmark.stats.stats.min / first
    benchmark.extra_info.update(first_run_s=round(first, 1), rerun_s=round(benchmark.stats.stats.min, 1),
                                rerun_over_first=round(ratio, 4))
    assert ratio <= 0.02, f"the rerun took {ratio:.3f} of the first run"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """`vlbench world pretrain` from an empty cache, with this machine's kernels: how the
    shipped world CLIP is rebuilt."""
    cache = tmp_path_factory.mktemp("rebuilt") / "cache"
    vlbench("world", "pretrain", cache=cache)
    return cache


@pytest.mark.slow
def test_a_rebuild_of_the_world_clip_reaches_the_release_bar(rebuilt):
    """The bar is quality, not identical bits: another machine's pretraining gives other
    weights, of the same quality."""
    from vlbench.world.pretrain import below_bar

    report = pretraining_report(rebuilt)
    metrics = report["metrics"]
    assert report["config"]["precision"] == "fp32"
    assert below_bar(metrics) == [] and metrics["world-shape"] >= 95, metrics


@pytest.mark.heavy
def test_world_pretraining_reaches_the_same_metrics_with_other_kernels(tmp_path, rebuilt):
    vlbench("world", "pretrain", cache=tmp_path / "cache", env=forced_family())
    ours, theirs = pretraining_metrics(rebuilt), pretraining_metrics(tmp_path / "cache")
    worst = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"\npretraining with {forced_family()}: largest difference {worst:.2f} points")
    assert worst <= 1.0, {k: (ours[k], theirs[k]) for k in ours}


@pytest.mark.slow
def test_the_shipped_world_clip_gives_every_user_the_same_undefended_cells(tmp_path, native):
    """The undefended row of the default matrix, evaluated with the other kernel family on
    the shipped weights: every cell within one sample of this machine's (a text attack's
    search can tip a sample whose candidates tie to the last bit)."""
    home, _ = native
    vlbench("run", "matrix", "--defenses", "none", "--out", str(tmp_path / "out"), "--no-progress",
            cache=tmp_path / "cache", env=forced_family())
    ours = {k: v for k, v in cells(home / "out").items() if k[0] == "none"}
    theirs = cells(tmp_path / "out")
    assert ours.keys() == theirs.keys() and len(ours) >= 38
    moved = {k: int(abs(ours[k][1].astype(int).sum() - theirs[k][1].astype(int).sum())) for k in ours}
    identical = sum(bool((ours[k][1] == theirs[k][1]).all()) for k in ours)
    print(f"\nundefended cells with {forced_family()}: {identical} of {len(ours)} identical sample by sample, "
          f"largest difference {max(moved.values())} sample(s)")
    assert max(moved.values()) <= 1, {k: v for k, v in moved.items() if v > 1}


@pytest.mark.heavy
def test_the_matrix_gives_the_same_cells_with_other_kernels(tmp_path, native):
    """The trained models of the native run (its cache), evaluated again with the other
    kernel family, from scratch: embeddings, every attack, every metric.

    A text attack's search picks one word among candidates whose scores can tie to the last
    bit, so a sample near a tie can end either way (on the world before its synonyms the
    largest gap was 3 samples, on the one after, 5, both in an ``mmcoa-attack`` cell); what
    must hold is that no cell's outcomes differ significantly between the families (exact
    McNemar on the same samples) and that the cells agree on average."""
    from vlbench.reporting.statistics import mcnemar_exact

    home, _ = native
    cache = tmp_path / "cache"
    cache.mkdir()
    for kept in ("world", "checkpoints", "augment"):  # the models; not the embedding cache
        if not (home / "cache" / kept).exists():
            continue
        subprocess.run(["cp", "-r", str(home / "cache" / kept), str(cache / kept)], check=True)
    vlbench("run", "matrix", "--out", str(tmp_path / "out"), "--no-progress", cache=cache, env=forced_family())
    a, b = cells(home / "out"), cells(tmp_path / "out")
    assert a.keys() == b.keys() and len(a) == 322
    gaps = sorted(((abs(a[k][0] - b[k][0]), k) for k in a), reverse=True)
    p_values = sorted((mcnemar_exact(a[k][1], b[k][1]), k) for k in a)
    mean = sum(g for g, _ in gaps) / len(gaps)
    print(f"\ncells with {forced_family()}: {sum(g == 0 for g, _ in gaps)} of {len(gaps)} identical, largest "
          f"difference {gaps[0][0]:.2f} points ({gaps[0][1]}), mean {mean:.3f}, smallest McNemar p "
          f"{p_values[0][0]:.3f} ({p_values[0][1]})")
    assert p_values[0][0] >= 0.01, p_values[:5]
    assert mean <= 0.25, gaps[:5]
