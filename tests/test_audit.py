"""The gradient-masking audit: the checks' decisions, the transfer attack, the audit config,
and `vlbench audit` firing on a deliberately masking defense while the undefended model passes."""

import json
from pathlib import Path

import pytest
import torch

from vlbench import api
from vlbench.cli import main
from vlbench.errors import UserError
from vlbench.reporting import checks
from vlbench.run.audit import AuditConfig

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = str(ROOT / "tests" / "masking_defense.py")


def cell(defense, attack, bits, dataset="world-colour"):
    return {"defense": defense, "attack": attack, "dataset": dataset, "task": "classification",
            "metrics": {"top1": 100.0 * bits.count("1") / len(bits)},
            "samples": {"ids": list(range(len(bits))), "top1": bits}}


def test_checks_fail_on_evidence_and_pass_on_noise():
    listed = [checks.Check("large", "at-most", ["big"], at_most=5),
              checks.Check("mono", "non-increasing", ["a", "b"]),
              checks.Check("bb", "not-stronger", ["white", "black"])]
    n = 60
    results = [
        # masked: a large budget leaves 50 %, the bigger budget is far above the smaller, black-box far stronger
        cell("masked", "big", "1" * 30 + "0" * 30), cell("masked", "a", "0" * n), cell("masked", "b", "1" * 20 + "0" * 40),
        cell("masked", "white", "1" * n), cell("masked", "black", "1" * 10 + "0" * 50),
        # sound: everything within two samples (noise)
        cell("sound", "big", "1" * 3 + "0" * 57), cell("sound", "a", "1" * 10 + "0" * 50),
        cell("sound", "b", "1" * 12 + "0" * 48), cell("sound", "white", "1" * 12 + "0" * 48),
        cell("sound", "black", "1" * 10 + "0" * 50),
        # partial: only the at-most check's attack ran
        cell("partial", "big", "0" * n),
    ]
    report = checks.run_checks(results, listed)
    assert report["masked"]["failed"] == ["large", "mono", "bb"]
    assert report["sound"]["failed"] == [] and report["sound"]["passed"] == ["large", "mono", "bb"]
    assert report["partial"]["passed"] == ["large"] and report["partial"]["undecided"] == ["mono", "bb"]
    bad = next(f for f in report["masked"]["findings"] if f["check"] == "bb")
    assert bad["p"] < 0.05 and "black 16.7 is below white 100.0" in bad["detail"]


def test_cells_on_different_samples_are_not_compared():
    a, b = cell("d", "a", "0" * 40), cell("d", "b", "1" * 40)
    b["samples"]["ids"] = list(range(100, 140))
    report = checks.run_checks([a, b], [checks.Check("mono", "non-increasing", ["a", "b"])])
    assert report["d"]["undecided"] == ["mono"] and report["d"]["failed"] == []


@pytest.mark.parametrize("raw, message", [
    ({"attacks": ["none"], "checks": [{"name": "x", "kind": "at-most", "attacks": ["pgd"], "at_most": 5}]},
     "names attacks ['pgd'] it does not run"),
    ({"attacks": ["none"], "checks": [{"name": "x", "kind": "sideways", "attacks": ["none"]}]}, "has kind 'sideways'"),
    ({"attacks": ["none"], "checks": [{"name": "x", "kind": "at-most", "attacks": ["none"]}]}, "has no number at_most"),
    ({"attacks": ["none"], "checks": [{"name": "x", "kind": "not-stronger", "attacks": ["none"]}]}, "lists 1 attacks"),
    ({"attacks": ["none"], "checks": []}, "has no checks"),
    ({"attacks": ["none"], "checks": [], "budget": 3}, "unknown keys ['budget']"),
])
def test_bad_audit_configs_are_one_line(raw, message):
    with pytest.raises(UserError, match=None) as caught:
        AuditConfig.from_dict(raw, "inline")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_default_audit_config_reads():
    audit = AuditConfig.load(True)
    assert [c.name for c in audit.checks] == ["large-budget", "monotone-in-eps", "more-iterations", "black-box",
                                              "transfer"]
    assert audit.limit == 100


def test_transfer_crafts_on_the_undefended_model(world_victim):
    """On the undefended model itself, transfer is the white-box attack, image for image;
    crafted on another model, it stays in its budget and in [0, 1]; eps 0 changes nothing."""
    from vlbench.evaluation.objectives import ClassificationObjective
    from vlbench.evaluation.perturb import SampleNoise
    from vlbench.world.scenes import ATTRIBUTES

    images, labels = _world_batch()
    weights_for = lambda v: torch.nn.functional.normalize(v.encode_texts(  # noqa: E731
        [f"a {c} shape." for c in ATTRIBUTES["colour"]]), dim=-1)
    objective = ClassificationObjective(world_victim, weights_for(world_victim), labels, SampleNoise(7, torch.arange(40)),
                                        weights_for=weights_for)
    params = {"eps": 4, "steps": 5, "step_size": 1}
    white = api.build("attacks", "pgd", params).perturb_images(world_victim, images, objective.on(world_victim),
                                                                torch.Generator().manual_seed(0))
    world_victim.set_undefended(world_victim)
    try:
        transfer = api.build("attacks", "transfer", {"params": params})
        same = transfer.perturb_images(world_victim, images, objective.on(world_victim), torch.Generator().manual_seed(1))
        assert torch.equal(same, white)
        zero = api.build("attacks", "transfer", {"params": {**params, "eps": 0}})
        assert torch.equal(zero.perturb_images(world_victim, images, objective, torch.Generator()), images)
    finally:
        world_victim.set_undefended(None)
    assert (same - images).abs().max() <= 4 / 255 + 1e-6 and same.min() >= 0 and same.max() <= 1
    with pytest.raises(UserError, match="needs the undefended model"):
        transfer.perturb_images(world_victim, images, objective, torch.Generator())


def _world_batch():
    from vlbench.world.scenes import ATTRIBUTES, render, sample_scenes

    scenes = sample_scenes("test", 40, seed=3)
    colours = ATTRIBUTES["colour"]
    return render(scenes), torch.as_tensor([colours.index(s.colour) for s in scenes])


def test_an_input_transform_changes_the_fingerprint_not_the_weights(world_victim):
    import copy

    masked = copy.deepcopy(world_victim)
    masked.set_input_transform(lambda x: torch.round(x * 7) / 7, {"transform": "round", "levels": 8})
    assert masked.fingerprint() != world_victim.fingerprint()
    assert "undefended" not in dict(masked.named_modules()) and len(masked.state_dict()) == len(world_victim.state_dict())
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    masked.encode_image(pixels).sum().backward()
    assert pixels.grad.abs().max() == 0  # the fixture's rounding masks every gradient


QUICK_AUDIT = """
limit: 40
attacks:
  - {name: pgd, label: pgd@4, eps: 4, steps: 5, step_size: 1}
  - {name: pgd, label: pgd@64, eps: 64, steps: 5, step_size: 16}
  - {name: pgd, label: pgd@255, eps: 255, steps: 5, step_size: 64}
  - {name: apgd-ce, label: apgd-ce@5it, eps: 4, iterations: 5}
  - {name: apgd-ce, label: apgd-ce@20it, eps: 4, iterations: 20}
  - {name: square, eps: 4, queries: 300}
  - {name: transfer, params: {eps: 4, steps: 5, step_size: 1}}
checks:
  - {name: large-budget, kind: at-most, attacks: [pgd@64, pgd@255], at_most: 5}
  - {name: monotone-in-eps, kind: non-increasing, attacks: [pgd@4, pgd@64, pgd@255]}
  - {name: more-iterations, kind: non-increasing, attacks: [apgd-ce@5it, apgd-ce@20it]}
  - {name: black-box, kind: not-stronger, attacks: [apgd-ce@20it, square]}
  - {name: transfer, kind: not-stronger, attacks: [pgd@4, transfer]}
"""


@pytest.mark.slow
def test_audit_flags_a_masking_defense_and_passes_the_undefended_model(tmp_path, capsys, world_checkpoint_path):
    config = tmp_path / "audit.yaml"
    config.write_text(QUICK_AUDIT)
    out = tmp_path / "out"
    common = ["--plugin", FIXTURE, "--pretrained", str(world_checkpoint_path), "--datasets", "world-colour",
              "--out", str(out), "--no-progress"]
    assert main(["run", "matrix", "--defenses", "none,quantised-input", "--attacks", "none", "--limit", "40",
                 *common]) == 0
    code = main(["audit", "none,quantised-input", "--checks", str(config), *common])
    printed = capsys.readouterr().out
    report = json.loads((out / "audit" / "checks.json").read_text())
    assert code == 1
    assert report["none"]["failed"] == [] and set(report["none"]["passed"]) == {
        "large-budget", "monotone-in-eps", "more-iterations", "black-box", "transfer"}
    assert {"large-budget", "black-box", "transfer"} <= set(report["quantised-input"]["failed"])
    assert "quantised-input: FAILED" in printed
    # the main leaderboard's rows carry the flags; the audit's cells stay out of its tables
    board = (out / "leaderboard.md").read_text()
    assert "quantised-input ⚑ large-budget" in board and "pgd@255" not in board
    assert "pgd@255" in (out / "audit" / "leaderboard.md").read_text()
    # the audit's cells are ordinary cells: a second audit reuses every one
    assert main(["audit", "none,quantised-input", "--checks", str(config), *common]) == 1
    assert "cells of" in (err := capsys.readouterr().err) and "are done" in err


@pytest.mark.slow
def test_checks_in_a_matrix_config_run_after_it(tmp_path, capsys, world_checkpoint_path):
    audit = tmp_path / "audit.yaml"
    audit.write_text(QUICK_AUDIT)
    config = tmp_path / "matrix.yaml"
    config.write_text(f"pretrained: {world_checkpoint_path}\nlimit: 40\nout: {tmp_path / 'out'}\n"
                      f"defenses: [none]\nattacks: [none]\ndatasets: [world-colour]\nchecks: {audit}\n")
    assert main(["run", "matrix", "--config", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "audit" / "checks.json").read_text())
    assert report["none"]["failed"] == [] and len(report["none"]["passed"]) == 5
    assert "passed every gradient-masking check the audit decided: none" in (tmp_path / "out" / "leaderboard.md").read_text()
    config.write_text(config.read_text().replace(str(audit), str(tmp_path / "missing.yaml")))
    assert main(["run", "matrix", "--config", str(config), "--no-progress"]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err



@pytest.mark.heavy
def test_tecoa_and_fare_pass_the_default_audit(tmp_path, monkeypatch):
    """The default audit (configs/audit.yaml, 100 samples) on the default matrix's tecoa and
    fare, from a cold cache, on world-colour, where they keep the most robustness: every
    check decided passes."""
    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["audit", "tecoa,fare", "--datasets", "world-colour", "--out", str(out), "--no-progress"])
    report = json.loads((out / "audit" / "checks.json").read_text())
    assert code == 0, report
    for defense in ("tecoa", "fare"):
        assert report[defense]["failed"] == [] and len(report[defense]["passed"]) == 5, report[defense]
