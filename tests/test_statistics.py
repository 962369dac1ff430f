"""Per-sample outcomes, intervals and paired tests: what the cells record, what the
statistics compute (against scipy and brute force), and what the leaderboard and
``vlbench compare`` show from them."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

from vlbench.cli import main
from vlbench.evaluation.metrics import first_positive_ranks, recall_at_k
from vlbench.reporting import statistics
from vlbench.reporting.leaderboard import write_leaderboard
from vlbench.run.matrix import run_matrix
from vlbench.store.embeddings import EmbeddingCache


@pytest.mark.parametrize("b, c", [(10, 2), (3, 3), (0, 7), (25, 14), (0, 0)])
def test_exact_mcnemar_is_the_binomial_test_on_the_discordant_pairs(b, c):
    first = np.array([1] * b + [0] * c + [1] * 5 + [0] * 4)
    second = np.array([0] * b + [1] * c + [1] * 5 + [0] * 4)
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert statistics.mcnemar_exact(first, second) == pytest.approx(expected, rel=1e-12)


def test_the_interval_is_seeded_and_as_wide_as_the_binomial_error():
    outcomes = np.array([1] * 160 + [0] * 40)
    low, high = statistics.interval([outcomes], "cell", "top1")
    assert (low, high) == statistics.interval([outcomes], "cell", "top1")
    assert low < 80 < high
    normal = 1.96 * 100 * np.sqrt(0.8 * 0.2 / 200)
    assert (high - low) / 2 == pytest.approx(normal, rel=0.2)
    # a mean over two datasets of equal size: the pooled error, narrower than either alone
    low2, high2 = statistics.interval([outcomes, outcomes[::-1].copy()], "cell", "top1")
    assert high2 - low2 < high - low


def test_paired_difference_finds_a_real_gap_and_no_gap():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.6).astype(np.uint8)
    same = statistics.paired_difference([base], [base.copy()], "a", "b", exact=False)
    assert same.value == 0 and same.p == 1.0
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1  # 40 more right, none fewer
    gap = statistics.paired_difference([better], [base], "a", "b", exact=True)
    assert gap.test == "exact McNemar" and gap.p < 1e-6
    assert gap.value == pytest.approx(100 * 40 / 300) and gap.low > 0
    small = better.copy()
    small[np.flatnonzero(base == 0)[2:40]] = 0  # two more right: noise
    assert statistics.paired_difference([small], [base], "a", "b", exact=True).p == pytest.approx(0.5)
    assert statistics.paired_difference([small], [base], "a", "b", exact=False).p > statistics.ALPHA


def test_ranks_are_a_stable_sorts_and_give_the_recall():
    torch.manual_seed(0)
    images = torch.randn(12, 8)
    texts = torch.randn(36, 8)
    texts[5] = texts[17]  # equal similarities: gallery order decides
    owner = torch.arange(12).repeat_interleave(3)
    ranks = first_positive_ranks(images, texts, owner)
    similarity = images @ texts.T
    for i in range(12):
        order = similarity[i].sort(descending=True, stable=True).indices
        assert ranks["i2t"][i] == 1 + next(r for r, t in enumerate(order.tolist()) if owner[t] == i)
    for t in range(36):
        order = similarity[:, t].sort(descending=True, stable=True).indices
        assert ranks["t2i"][t] == 1 + order.tolist().index(int(owner[t]))
    recall = recall_at_k(images, texts, owner)
    assert recall["i2t_R@5"] == pytest.approx(100 * (ranks["i2t"] <= 5).float().mean().item())


def test_cells_record_each_samples_outcome(tmp_path, world_checkpoint_path):
    from test_runner import config

    cfg = config(tmp_path / "out", world_checkpoint_path, limit=24)
    run_matrix(cfg, progress=False, cache=EmbeddingCache(tmp_path / "cache"))
    cells = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "cells").glob("*.json"))]
    assert len(cells) == 4
    for cell in cells:
        samples = cell["samples"]
        assert len(samples["ids"]) == cell["n"] == 24
        for metric, value in cell["metrics"].items():
            found = statistics.outcomes(cell, metric)
            if metric.endswith("top1") or "_R@" in metric and not metric.startswith("asr"):
                assert found is not None, metric
                assert 100 * found.mean() == pytest.approx(value), (cell["cell"], metric)
        if cell["task"] == "retrieval":
            assert len(samples["t2i_rank"]) == len(samples["text_images"]) > cell["n"]


def cell(folder, defense, attack, dataset, correct, ids=None, task="classification", created="00:00"):
    """A result file with the given per-sample correctness (a 0/1 list)."""
    bits = "".join(map(str, correct))
    ids = list(range(len(correct))) if ids is None else ids
    name = f"{defense}__{attack}__{dataset}"
    value = 100 * sum(correct) / len(correct)
    payload = {"schema": 3, "cell": name, "defense": defense, "attack": attack, "dataset": dataset, "task": task,
               "metrics": {"top1": value, "clean_top1": value}, "n": len(correct), "subset_hash": "s", "seed": 0,
               "created": f"2026-01-01T{created}:00+00:00", "code_revision": "abc",
               "config": {"defense": {"name": defense, "version": "1"}, "attack": {"name": attack, "version": "1"}},
               "samples": {"ids": ids, "top1": bits, "clean_top1": bits}}
    (folder / f"{name}.json").write_text(json.dumps(payload))


@pytest.fixture
def three_rows(tmp_path):
    best = [1] * 90 + [0] * 10
    tied = [1] * 88 + [0] * 12          # two fewer: not significant
    worse = [1] * 60 + [0] * 40         # thirty fewer: significant
    for dataset in ("a", "b"):
        for defense, correct in (("best", best), ("tied", tied), ("worse", worse)):
            cell(tmp_path, defense, "pgd", dataset, correct)
    return tmp_path


def test_the_leaderboard_shows_intervals_and_marks_rows_tied_with_the_best(three_rows):
    write_leaderboard(three_rows)
    markdown = (three_rows / "leaderboard.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    half = (np.subtract(*statistics.interval([np.array([1] * 90 + [0] * 10)], "best__pgd__a", "top1")[::-1])) / 2
    assert f"**90.0 ± {half:.1f}**" in rows["best"]
    assert "**88.0 ±" in rows["tied"] and "**" not in rows["worse"] and "60.0 ±" in rows["worse"]
    assert "bootstrap interval" in markdown
    long = pd.read_csv(three_rows / "leaderboard.csv")
    assert (long["ci_low"] <= long["value"]).all() and (long["value"] <= long["ci_high"]).all()
    assert "<strong>90.0 ±" in (three_rows / "leaderboard.html").read_text()


def test_means_pair_dataset_by_dataset_whatever_order_the_cells_were_written_in(three_rows, capsys):
    cell(three_rows, "tied", "pgd", "a", [1] * 88 + [0] * 12, created="02:00")
    cell(three_rows, "tied", "pgd", "b", [1] * 88 + [0] * 12, created="01:00")
    write_leaderboard(three_rows)
    markdown = (three_rows / "leaderboard.md").read_text()
    mean_table = markdown.split("Mean top-1")[1].split("Every dataset")[0]
    assert "**88.0 ±" in next(line for line in mean_table.splitlines() if line.startswith("| tied"))
    assert main(["compare", str(three_rows), "--defenses", "best,tied"]) == 0
    assert "not on the same" not in capsys.readouterr().out


def test_rows_on_other_samples_are_not_paired(three_rows):
    cell(three_rows, "tied", "pgd", "a", [1] * 88 + [0] * 12, ids=list(range(100, 200)))
    cell(three_rows, "tied", "pgd", "b", [1] * 88 + [0] * 12, ids=list(range(100, 200)))
    write_leaderboard(three_rows)
    markdown = (three_rows / "leaderboard.md").read_text()
    tied = next(line for line in markdown.splitlines() if line.startswith("| tied"))
    assert "**" not in tied


def test_compare_prints_paired_differences(three_rows, capsys):
    assert main(["compare", str(three_rows), "--defenses", "best,worse"]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| pgd")]
    assert len(lines) == 3  # a, b and their mean
    assert all("30.0" in line and "*" in line for line in lines)
    assert "exact McNemar" in lines[0] and "paired bootstrap" in lines[-1]
    assert main(["compare", str(three_rows), "--defenses", "best,nope"]) == 2
    assert "no defense 'nope'" in capsys.readouterr().err
