"""Training seeds: a defense trained once per seed, each seed's cells apart, the leaderboard's
row their mean with an interval over seeds and test samples, and `vlbench compare` testing
with the seeds (a hierarchical bootstrap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlbench.cli import main
from vlbench.errors import UserError
from vlbench.reporting import statistics
from vlbench.reporting.compare import compare
from vlbench.reporting.leaderboard import write_leaderboard
from vlbench.run.matrix import MatrixConfig, PluginSpec, make_plan, run_matrix

RNG = np.random.default_rng(0)


def outcomes(accuracy: float, n: int = 400) -> np.ndarray:
    return (RNG.random(n) < accuracy).astype(np.uint8)


def test_one_seed_is_the_per_sample_bootstrap():
    groups = [outcomes(0.7), outcomes(0.6)]
    assert statistics.seeded_interval([groups], "c", "top1") == statistics.interval(groups, "c", "top1")
    other = [outcomes(0.5), outcomes(0.6)]
    one = statistics.seeded_difference([groups], [other], "c", exact=False)
    assert (one.value, one.p, one.test) == (lambda d: (d.value, d.p, d.test))(
        statistics.paired_difference(groups, other, "c", exact=False))


def test_the_interval_widens_with_the_spread_between_seeds():
    same = [[outcomes(0.7)] for _ in range(3)]
    spread = [[outcomes(a)] for a in (0.55, 0.7, 0.85)]
    low_same, high_same = statistics.seeded_interval(same, "a")
    low_spread, high_spread = statistics.seeded_interval(spread, "a")
    assert high_spread - low_spread > 2 * (high_same - low_same)
    assert low_spread < 70 < high_spread
    assert statistics.seeded_interval(spread, "a") == (low_spread, high_spread)  # seeded: the same every time


def test_a_gap_that_one_training_shows_is_not_significant_across_seeds():
    """Two defenses whose trainings scatter: seed 0 of one beats seed 0 of the other by 8
    points, significant on 400 samples; over three seeds each, the means differ by 1 point
    and the hierarchical test says so."""
    base = RNG.random(400)
    first = [[(base < a).astype(np.uint8)] for a in (0.78, 0.62, 0.70)]
    second = [[(base < a).astype(np.uint8)] for a in (0.70, 0.76, 0.61)]
    single = statistics.paired_difference(first[0], second[0], "x", exact=False)
    assert single.p < 0.01
    seeded = statistics.seeded_difference(first, second, "x", exact=True)
    assert seeded.test == "hierarchical bootstrap (seeds, then samples)"
    assert seeded.value == pytest.approx(100 * (np.mean([g[0].mean() for g in first])
                                                - np.mean([g[0].mean() for g in second])))
    assert seeded.p > 0.2 and seeded.low < 0 < seeded.high
    # a real gap between consistent trainings stays significant
    better = [[(base < a).astype(np.uint8)] for a in (0.86, 0.88, 0.87)]
    assert statistics.seeded_difference(better, second, "x", exact=False).p < 0.05


def seeded_config(out, checkpoint, **overrides):
    vanilla = PluginSpec("vanilla", "vanilla", {"steps": 3, "batch_size": 8, "warmup": 1, "train_datasets": ["world-colour"]})
    values = dict(pretrained=str(checkpoint), out=str(out), limit=40, batch_size=40, training_seeds=[0, 1, 2],
                  defenses=[PluginSpec("none", "none"), vanilla], attacks=[PluginSpec("none", "none")],
                  datasets=["world-colour", "world-size"])
    values.update(overrides)
    return MatrixConfig(**values)


def test_each_training_seed_is_trained_and_evaluated_apart(tmp_path, world_checkpoint_path, capsys):
    cfg = seeded_config(tmp_path / "out", world_checkpoint_path)
    plan = make_plan(cfg)
    assert sorted((c.defense_label, c.training_seed) for c in plan.cells if c.dataset == "world-colour") == [
        ("none", None), ("vanilla", 0), ("vanilla", 1), ("vanilla", 2)]
    assert len({c.id for c in plan.cells}) == len(plan.cells) == 8
    run_matrix(cfg, progress=False)
    cells = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cells").glob("*.json")]
    trained = [c for c in cells if c["defense"] == "vanilla"]
    assert sorted({c["training_seed"] for c in trained}) == [0, 1, 2]
    assert len({c["model"]["fingerprint"] for c in trained}) == 3  # three trainings, three models
    assert {c["training_seed"] for c in cells if c["defense"] == "none"} == {None}

    write_leaderboard(tmp_path / "out")
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "interval of the mean over training seeds (vanilla 3 seeds)" in board
    assert "over test samples only for none" in board
    rows = [line for line in board.splitlines() if line.startswith("| vanilla")]
    means = {}
    for c in trained:
        means.setdefault(c["training_seed"], []).append(c["metrics"]["top1"])
    expected = np.mean([np.mean(v) for v in means.values()])
    assert f"{expected:.1f} ±" in rows[0]

    table = compare(tmp_path / "out", "vanilla", "none")
    assert set(table["test"].str.rstrip(" *")) == {"hierarchical bootstrap (seeds, then samples)"}
    assert main(["compare", str(tmp_path / "out"), "--defenses", "vanilla,none"]) == 0
    assert "hierarchical bootstrap" in capsys.readouterr().out


def test_one_seed_tables_say_their_intervals_cover_samples_only(tmp_path, world_checkpoint_path):
    cfg = seeded_config(tmp_path / "out", world_checkpoint_path, training_seeds=None, datasets=["world-colour"])
    run_matrix(cfg, progress=False)
    write_leaderboard(tmp_path / "out")
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "bootstrap interval over test samples: each row is one training" in board
    assert compare(tmp_path / "out", "vanilla", "none")["test"].str.rstrip(" *").tolist() == ["exact McNemar"]


@pytest.mark.parametrize("seeds, defense, expected", [
    ([0, 0], {"steps": 3}, "must list distinct seeds"),
    ([0, 1], {"steps": 3, "seed": 4}, "sets seed: while the config sets training_seeds"),
])
def test_bad_training_seeds_are_one_line(tmp_path, world_checkpoint_path, seeds, defense, expected):
    cfg = seeded_config(tmp_path, world_checkpoint_path, training_seeds=seeds,
                        defenses=[PluginSpec("vanilla", "vanilla", defense)])
    with pytest.raises(UserError, match=expected):
        make_plan(cfg)


def test_a_bad_training_seeds_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "matrix", "--training-seeds", "0,x", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "'0,x' is not comma-separated integers" in capsys.readouterr().err
