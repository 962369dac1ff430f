"""The default matrix from a cold cache, end to end, as the README's main command runs it:
the same numbers with another CPU kernel family, and a rerun that finds every cell done.

PyTorch picks its kernels by CPU (``torch.backends.cpu.get_cpu_capability()``; oneDNN its
own). The test runs ``vlbench run matrix`` twice in fresh caches, once with the machine's
own choice and once with the next family down forced (AVX-512 → AVX2, AVX2 → no
vectorisation, through ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``), and compares the
world pretraining's metrics (within 1 point) and every cell of the leaderboard (within 2).
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


def run_default_matrix(home: Path, extra_env: dict[str, str] | None = None) -> float:
    """``vlbench run matrix`` in a subprocess with its own cache; returns the wall time."""
    env = {**os.environ, "VLBENCH_CACHE": str(home / "cache"), **(extra_env or {})}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlbench", "run", "matrix", "--out", str(home / "out"), "--no-progress"],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def pretraining_metrics(home: Path) -> dict[str, float]:
    (sidecar,) = (home / "cache" / "world").glob("vlbench-world-*.json")
    return json.loads(sidecar.read_text())["metrics"]


def headline(home: Path) -> dict[tuple[str, str, str, str], float]:
    from vlbench.tasks import PRIMARY_METRICS

    values = {}
    for path in (home / "out" / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        for metric in PRIMARY_METRICS[cell["task"]]:
            values[(cell["defense"], cell["attack"], cell["dataset"], metric)] = cell["metrics"][metric]
    return values


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    home = tmp_path_factory.mktemp("native")
    return home, run_default_matrix(home)


@pytest.mark.slow
@pytest.mark.benchmark(group="matrix")
def test_a_rerun_of_the_default_matrix_finds_every_cell(benchmark, native):
    home, first = native
    benchmark.pedantic(lambda: run_default_matrix(home), rounds=1, iterations=1)
    ratio = benchmark.stats.stats.min / first
    benchmark.extra_info.update(first_run_s=round(first, 1), rerun_s=round(benchmark.stats.stats.min, 1),
                                rerun_over_first=round(ratio, 4))
    assert ratio <= 0.02, f"the rerun took {ratio:.3f} of the first run"


@pytest.mark.slow
def test_another_kernel_family_gives_the_same_numbers(tmp_path, native):
    home, _ = native
    capability = torch.backends.cpu.get_cpu_capability()
    forced = FORCED.get("AVX512" if capability.startswith("AVX512") else "AVX2")
    other = tmp_path / "forced"
    run_default_matrix(other, forced)

    ours, theirs = pretraining_metrics(home), pretraining_metrics(other)
    worst = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"\npretraining, {capability} against {forced}: largest difference {worst:.2f} points")
    assert worst <= 1.0, {k: (ours[k], theirs[k]) for k in ours}

    a, b = headline(home), headline(other)
    assert a.keys() == b.keys() and len(a) > 100
    gaps = sorted(((abs(a[k] - b[k]), k) for k in a), reverse=True)
    print(f"cells: largest difference {gaps[0][0]:.2f} points ({gaps[0][1]}); "
          f"mean {sum(g for g, _ in gaps) / len(gaps):.2f}")
    assert gaps[0][0] <= 2.0, gaps[:5]
