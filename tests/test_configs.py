"""The shipped matrix configs load and plan the cells their protocols call for."""

import pytest

from vlbench.cli import build_parser, matrix_config
from vlbench.run.matrix import make_plan
from vlbench.store.paths import builtin_root


@pytest.fixture(autouse=True)
def weights_not_needed(monkeypatch):
    """Planning names each row's base model by the sha256 of its weights; the paper protocols'
    OpenAI weights are not on this machine, and what is planned does not depend on them."""
    import vlbench.run.bases as bases

    real = bases.fingerprint
    monkeypatch.setattr(bases, "fingerprint", lambda spec, precision: (
        real(spec, precision) if spec.weights.kind == "build" else f"sha256-of-{spec.name}"))


def plan(name):
    args = build_parser().parse_args(["run", "matrix", "--config", str(builtin_root() / "configs" / f"{name}.yaml")])
    return make_plan(matrix_config(args))


@pytest.mark.parametrize("name, cells, skipped", [
    ("world", 266, 154),       # 7 defense entries x 10 attacks x 6 datasets, minus cells that do not apply
    ("world-seeds", 19 * 38, 19 * 22),  # world's 6 trained rows x 3 seeds + none, 38 cells each
    ("world-attacks", 70, 26),     # 16 attacks x 6 datasets, minus classification-only / retrieval-only pairs
    ("tecoa", 3 * 4 * 15, 0),
    ("mmcoa", 3 * 4 * 15, 0),
    ("fare", 4 * 3 * 12, 0),
    ("nn", 3 * 3 * 2, 0),
    ("zoo-vit-b-32", 9 * 3 * 13, 0),     # released models as rows: 9 entries x clean, AA at 1 and 4/255 x 13
    ("zoo-vit-l-14", 10 * 3 * 13, 0),
])
def test_config_plans_expected_cells(name, cells, skipped):
    result = plan(name)
    assert (len(result.cells), len(result.skipped)) == (cells, skipped)
    assert len({cell.id for cell in result.cells}) == cells


def test_the_seeded_protocol_is_the_default_one_with_three_trainings_per_defense():
    """configs/world-seeds.yaml extends world.yaml: its seed-0 cells are the default matrix's
    cells (the same keys, so the same checkpoints), seeds 1 and 2 train anew."""
    from vlbench.store.files import stable_hash

    world, seeded = plan("world"), plan("world-seeds")
    keys = {stable_hash(c.config, 10) for c in world.cells}
    assert {stable_hash(c.config, 10) for c in seeded.cells if c.training_seed in (0, None)} == keys
    assert {c.training_seed for c in seeded.cells if c.defense.trains} == {0, 1, 2}
    assert {c.training_seed for c in seeded.cells if c.defense_label == "none"} == {None}


def test_paper_protocols_use_the_papers_settings():
    tecoa = plan("tecoa")
    pgd = next(c for c in tecoa.cells if c.attack_label == "pgd-100")
    assert pgd.config["attack"]["threat_model"]["eps_255"] == 1 and pgd.config["attack"]["params"]["steps"] == 100
    assert {(c.config["model"]["arch"], c.config["model"]["tag"]) for c in tecoa.cells} == {("ViT-B-32", "openai")}
    fare = plan("fare")
    assert {c.config["defense"]["params"]["eps"] for c in fare.cells if c.defense_label.startswith("fare")} == {2.0, 4.0}
    nn = plan("nn")
    assert {c.config["model"]["entry"] for c in nn.cells} == {"openai-vit-b-16"}
    assert {(c.defense_label, tuple(c.config["defense"]["params"].get("augment", ()))) for c in nn.cells} == {
        ("none", ()), ("mat", ("none",)), ("nn", ("all",))}
    assert {c.config["attack"]["threat_model"]["image"]["eps_255"] for c in nn.cells if c.attack_label != "none"} == {2}
    world = plan("world-attacks")
    skipped = {(a, d) for _, a, d, _ in world.skipped}
    assert ("co-attack", "world-shape") in skipped and ("autoattack", "world-retrieval") in skipped


def test_the_zoo_protocols_put_each_release_on_its_own_row():
    for name, arch in (("zoo-vit-b-32", "ViT-B-32"), ("zoo-vit-l-14", "ViT-L-14")):
        cells = plan(name).cells
        rows = {c.defense_label: c.config["model"] for c in cells}
        assert all(label == model["entry"] for label, model in rows.items())  # each row named by its model
        assert {model["arch"] for model in rows.values()} == {arch}
        assert {c.defense.name for c in cells} == {"none"}
        assert {c.config["attack"]["threat_model"].get("eps_255") for c in cells} == {None, 1.0, 4.0}
        assert {c.dataset for c in cells} == {"cifar10", "stl10", "cifar100", "stanford-cars", "caltech101",
                                              "oxford-pets", "flowers102", "dtd", "eurosat", "fgvc-aircraft",
                                              "pcam", "imagenet-r", "imagenet-sketch"}
    tecoa = next(c for c in plan("zoo-vit-b-32").cells if c.defense_label == "tecoa-vit-b-32")
    assert tecoa.config["model"]["base"]["entry"] == "openai-vit-b-32"

