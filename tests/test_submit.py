"""Submitting a defense: the example package installed through its entry point, validated,
submitted on a small world protocol against a baseline folder, its row in the merged page;
and a plugin that fails validation gets no compute and no submission folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vlbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vlbench-label-smoothing"


@pytest.fixture
def protocol(tmp_path, world_checkpoint_path):
    """A small world protocol: none and a short vanilla recipe × clean and PGD, two tasks."""
    recipe = {"train_datasets": ["world-shape", "world-colour"], "split": "train", "steps": 6, "batch_size": 8,
              "lr": 2.0e-4, "warmup": 1, "optimizer": "adamw", "weight_decay": 0.0}
    config = {"model": "vlbench-world", "pretrained": str(world_checkpoint_path), "seed": 0, "limit": 30,
              "batch_size": 64, "defenses": ["none", {"vanilla": recipe}],
              "attacks": ["none", {"pgd": {"eps": 4, "steps": 2, "step_size": 2}}],
              "datasets": ["world-shape", "world-colour"]}
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def vlbench(*args: str) -> subprocess.CompletedProcess:
    """The command line in a new process: one that sees the freshly installed package."""
    return subprocess.run([sys.executable, "-m", "vlbench", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # installs a package into the test's venv (and removes it) and runs three processes
def test_the_example_package_installs_validates_and_submits_into_a_merged_page(tmp_path, protocol):
    base, submission = tmp_path / "base", tmp_path / "submission"
    assert main(["run", "matrix", "--config", str(protocol), "--out", str(base), "--no-progress"]) == 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    try:
        listed = vlbench("ls", "defenses")
        assert listed.returncode == 0 and "label-smoothing" in listed.stdout
        checked = vlbench("validate", "label-smoothing", "--pretrained", yaml.safe_load(protocol.read_text())["pretrained"])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "trains only what it declares" in checked.stdout and "FAIL" not in checked.stdout
        submitted = vlbench("submit", "label-smoothing", "--protocol", str(protocol), "--like", "vanilla",
                            "--baseline", str(base), "--out", str(submission), "--no-progress")
        assert submitted.returncode == 0, submitted.stderr[-3000:]
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "vlbench-label-smoothing"],
                       capture_output=True, timeout=300)
    # only the new defense's cells ran; the card says what it is and how it ran
    cells = [json.loads(p.read_text()) for p in (submission / "cells").glob("*.json")]
    assert len(cells) == 4 and {c["defense"] for c in cells} == {"label-smoothing"}
    card = json.loads((submission / "submission.json").read_text())
    assert card["name"] == "label-smoothing" and card["version"] == "1" and "Szegedy" in card["paper"]
    assert card["params"]["smoothing"] == 0.1 and card["params"]["steps"] == 6   # vanilla's recipe
    assert card["params"]["train_datasets"] == ["world-shape", "world-colour"] and card["code_revision"]
    assert any("trains only what it declares" in line for line in card["validate"])
    # the merged page: the new row among the built-ins, with its section
    markdown = (submission / "leaderboard.md").read_text()
    for row in ("| none ", "| vanilla ", "| label-smoothing "):
        assert row in markdown
    page = (submission / "leaderboard.html").read_text()
    assert 'id="defense-label-smoothing"' in page and 'id="defense-vanilla"' in page
    assert "vlbench submit label-smoothing" in page   # the command, in the provenance


def test_a_plugin_that_fails_validation_is_not_submitted(tmp_path, protocol):
    plugin = tmp_path / "careless.py"
    plugin.write_text(textwrap.dedent('''
        """A defense that forgets its version."""
        from vlbench.api import defenses
        from vlbench.training.defenses import ClassPromptParams, TrainingDefense

        @defenses.register("careless")
        class Careless(TrainingDefense):
            """Declares no version."""
            paper = "none"
            description = "no version"
            Params = ClassPromptParams
    '''))
    out = tmp_path / "submission"
    assert main(["submit", str(plugin), "--protocol", str(protocol), "--out", str(out)]) == 2
    assert not out.exists()
