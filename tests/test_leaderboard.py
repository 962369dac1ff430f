"""Leaderboards from result files: long CSV, pivoted Markdown/HTML, subset mismatches flagged."""

import json

import pandas as pd
import pytest

from vlbench.cli import main
from vlbench.reporting.leaderboard import write_leaderboard


def result(folder, defense, attack, dataset, task, metrics, subset="s1", n=100, revision="abc", version="1"):
    cell = f"{defense}__{attack}__{dataset}"
    config = {"defense": {"name": defense, "version": "1"}, "attack": {"name": attack, "version": version}}
    payload = {"schema": 1, "cell": cell, "defense": defense, "attack": attack, "dataset": dataset,
               "task": task, "metrics": metrics, "n": n, "subset_hash": subset, "seed": 0,
               "created": "2026-01-01T00:00:00+00:00", "code_revision": revision, "config": config}
    (folder / f"{cell}.json").write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path):
    for defense, clean, robust in (("none", 90.0, 10.0), ("vanilla", 92.0, 5.0)):
        for dataset in ("a", "b"):
            result(tmp_path, defense, "none", dataset, "classification", {"top1": clean, "clean_top1": clean})
            result(tmp_path, defense, "pgd", dataset, "classification", {"top1": robust, "clean_top1": clean})
        result(tmp_path, defense, "none", "r", "retrieval", {"i2t_R@1": 60.0, "t2i_R@1": 50.0, "i2t_R@5": 80.0})
    return tmp_path


def test_long_csv_has_every_metric(results):
    write_leaderboard(results)
    long = pd.read_csv(results / "leaderboard.csv")
    assert {"defense", "attack", "dataset", "task", "metric", "value", "n"} <= set(long.columns)
    assert len(long) == 2 * (2 * 2 * 2 + 3)


def test_markdown_pivots_defenses_by_dataset_and_attack(results, capsys):
    assert main(["leaderboard", str(results)]) == 0
    printed = capsys.readouterr().out
    markdown = (results / "leaderboard.md").read_text()
    headers = [line for line in markdown.splitlines() if line.startswith("| defense")]
    mean_header, retrieval_header, full_header = headers
    for column in ("a clean", "a pgd", "b clean", "b pgd", "r i2t_R@1 clean", "r t2i_R@1 clean"):
        assert column in full_header
    assert "clean" in mean_header and "pgd" in mean_header and "Mean top-1 (%) over the 2" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| none")]
    assert "90.0" in rows[0] and "10.0" in rows[0]       # the means
    assert "**60.0** / **50.0**" in rows[1]               # retrieval R@1 both ways, tied: both marked
    # the terminal gets the compact tables, and the path of the full one
    assert mean_header in printed and full_header not in printed and "leaderboard.md" in printed
    assert (results / "leaderboard.html").read_text().startswith("<!doctype html>")


def test_different_subsets_are_flagged(results):
    result(results, "vanilla", "pgd", "a", "classification", {"top1": 1.0, "clean_top1": 92.0}, subset="other")
    write_leaderboard(results)
    markdown = (results / "leaderboard.md").read_text()
    assert "a pgd †" in markdown and "different evaluation subsets" in markdown


def test_tables_mixing_code_revisions_or_plugin_versions_are_marked(results):
    write_leaderboard(results)
    assert "‡" not in (results / "leaderboard.md").read_text()
    result(results, "vanilla", "pgd", "a", "classification", {"top1": 1.0, "clean_top1": 92.0}, version="2")
    write_leaderboard(results)
    markdown = (results / "leaderboard.md").read_text()
    assert "Mean top-1 (%) over the 2 classification datasets ‡" in markdown and "Every dataset ‡" in markdown
    assert "r: R@1 (%) image→text / text→image ‡" not in markdown    # its cells are all of one code
    assert "pgd versions 1, 2" in markdown
    result(results, "none", "none", "r", "retrieval", {"i2t_R@1": 60.0, "t2i_R@1": 50.0}, revision="def")
    write_leaderboard(results)
    markdown = (results / "leaderboard.md").read_text()
    assert "r: R@1 (%) image→text / text→image ‡" in markdown and "code revisions abc, def" in markdown


def test_empty_or_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "missing")]) == 2
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_worst_case_ensemble_above_its_component_is_flagged(tmp_path):
    component = {"name": "apgd-ce", "params": {"eps": 4}}
    ensemble = {"name": "autoattack", "params": {}, "components": [component], "worst_case_over_components": True}
    sequential = {"name": "two-stage", "params": {}, "components": [component]}
    for attack, value, config in (("apgd-ce", 20.0, component), ("autoattack", 30.0, ensemble),
                                  ("two-stage", 40.0, sequential)):
        payload = {"schema": 1, "cell": attack, "defense": "none", "attack": attack, "dataset": "a",
                   "task": "classification", "metrics": {"top1": value}, "n": 10, "subset_hash": "s",
                   "created": "2026", "config": {"attack": config}, "warnings": ["robust above clean"] * (attack == "apgd-ce")}
        (tmp_path / f"{attack}.json").write_text(json.dumps(payload))
    write_leaderboard(tmp_path)
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert "autoattack (30.0) is above its component apgd-ce (20.0)" in markdown
    assert "two-stage (40.0)" not in markdown  # a sequential composition promises no ordering
    assert "1 cell(s) carry warnings" in markdown


def test_html_escapes_labels_and_notes(tmp_path):
    """A label is whatever a config says; in the HTML page it is text, never markup."""
    label = "<img src=x onerror=alert(1)>"
    result(tmp_path, label, "none", "a", "classification", {"top1": 90.0, "clean_top1": 90.0})
    result(tmp_path, label, "pgd", "a", "classification", {"top1": 10.0, "clean_top1": 90.0})
    payload = json.loads(next(tmp_path.glob("*pgd*.json")).read_text())
    (tmp_path / "warned.json").write_text(json.dumps({**payload, "warnings": ["robust above clean"]}))
    write_leaderboard(tmp_path)
    page = (tmp_path / "leaderboard.html").read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("&lt;img") >= 2   # in a table and in the warnings note


def test_sweeps_get_their_own_curve_tables(tmp_path):
    for defense, values in (("none", (50.0, 30.0, 10.0)), ("tecoa", (80.0, 60.0, 40.0))):
        for dataset in ("a", "b"):
            result(tmp_path, defense, "none", dataset, "classification", {"top1": 90.0, "clean_top1": 90.0})
            for eps, value in zip((4, 1, 2), values[::-1][:1] + values[:2]):  # written out of order
                result(tmp_path, defense, f"pgd@{eps}", dataset, "classification", {"top1": value, "clean_top1": 90.0})
    write_leaderboard(tmp_path)
    markdown = (tmp_path / "leaderboard.md").read_text()
    caption = "**pgd at each swept value — Mean top-1 (%) over the 2 classification datasets**"
    assert caption in markdown
    curve = markdown.split(caption)[1]
    header = next(line for line in curve.splitlines() if line.startswith("| defense"))
    assert [c.strip() for c in header.split("|")[2:-1]] == ["clean", "1", "2", "4"]
    tecoa = next(line for line in curve.splitlines() if line.startswith("| tecoa"))
    assert [c.strip(" *") for c in tecoa.split("|")[2:-1]] == ["90.0", "80.0", "60.0", "40.0"]
    # the main summary leaves the swept columns to the curve
    main_header = next(line for line in markdown.splitlines() if line.startswith("| defense"))
    assert "pgd@" not in main_header


def test_a_sweep_gets_no_curve_on_a_task_it_did_not_run(tmp_path):
    for defense in ("none", "tecoa"):
        result(tmp_path, defense, "none", "r", "retrieval", {"i2t_R@1": 90.0, "t2i_R@1": 80.0})
        for dataset in ("a", "b"):
            result(tmp_path, defense, "none", dataset, "classification", {"top1": 90.0, "clean_top1": 90.0})
            for eps in (1, 2):
                result(tmp_path, defense, f"apgd-ce@{eps}", dataset, "classification", {"top1": 50.0 / eps})
    write_leaderboard(tmp_path)
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert "apgd-ce at each swept value — Mean top-1" in markdown
    assert "apgd-ce at each swept value — r:" not in markdown
