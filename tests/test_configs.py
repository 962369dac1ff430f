"""The shipped matrix configs load and plan the cells their protocols call for."""

import pytest

from vlbench.cli import build_parser, matrix_config
from vlbench.run.matrix import make_plan
from vlbench.store.paths import builtin_root


def plan(name):
    args = build_parser().parse_args(["run", "matrix", "--config", str(builtin_root() / "configs" / f"{name}.yaml")])
    return make_plan(matrix_config(args))


@pytest.mark.parametrize("name, cells, skipped", [
    ("world", 266, 154),       # 7 defense entries x 10 attacks x 6 datasets, minus cells that do not apply
    ("world-attacks", 70, 26),     # 16 attacks x 6 datasets, minus classification-only / retrieval-only pairs
    ("tecoa", 3 * 4 * 15, 0),
    ("mmcoa", 3 * 4 * 15, 0),
    ("fare", 4 * 3 * 12, 0),
    ("nn", 3 * 3 * 2, 0),
])
def test_config_plans_expected_cells(name, cells, skipped):
    result = plan(name)
    assert (len(result.cells), len(result.skipped)) == (cells, skipped)
    assert len({cell.id for cell in result.cells}) == cells


def test_paper_protocols_use_the_papers_settings():
    tecoa = plan("tecoa")
    pgd = next(c for c in tecoa.cells if c.attack_label == "pgd-100")
    assert pgd.config["attack"]["threat_model"]["eps_255"] == 1 and pgd.config["attack"]["params"]["steps"] == 100
    assert {c.config["model"] for c in tecoa.cells} == {"ViT-B-32"}
    fare = plan("fare")
    assert {c.config["defense"]["params"]["eps"] for c in fare.cells if c.defense_label.startswith("fare")} == {2.0, 4.0}
    nn = plan("nn")
    assert {c.config["model"] for c in nn.cells} == {"ViT-B-16"}
    assert {(c.defense_label, tuple(c.config["defense"]["params"].get("augment", ()))) for c in nn.cells} == {
        ("none", ()), ("mat", ("none",)), ("nn", ("all",))}
    assert {c.config["attack"]["threat_model"]["image"]["eps_255"] for c in nn.cells if c.attack_label != "none"} == {2}
    world = plan("world-attacks")
    skipped = {(a, d) for _, a, d, _ in world.skipped}
    assert ("co-attack", "world-shape") in skipped and ("autoattack", "world-retrieval") in skipped
