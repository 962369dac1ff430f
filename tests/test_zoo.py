"""Released models as leaderboard rows: the world CLIP, two releases in their published formats
(one fetched from a local Hugging Face endpoint) and a defense vlbench trains, side by side
in one folder and one page; each row says what model it is; cells are keyed by the weights;
a folder with another seed does not merge.

The releases are the world CLIP fine-tuned by vlbench's own tecoa and fare, exported in the
TeCoA code's checkpoint format and in open_clip's Hugging Face layout: a release must give the
numbers of the model it was exported from, cell for cell."""

import json

import torch
import yaml

from model_server import ModelServer
from results_of import metrics_by_cell
from vlbench.cli import main

TRAINING = {"train_datasets": ["world-colour"], "steps": 3, "batch_size": 8, "warmup": 0, "lr": 1e-4,
            "eps": 4, "attack_steps": 1, "attack_step_size": 4}
COMMON = {"limit": 40, "batch_size": 40, "datasets": ["world-colour", "world-shape"],
          "attacks": ["none", {"pgd": {"eps": 4, "steps": 3, "step_size": 2}}]}


def run(capsys, config, *extra) -> tuple[int, str]:
    code = main(["run", "matrix", "--config", str(config), "--no-progress", *extra])
    return code, capsys.readouterr().err


def cells(folder):
    return [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]


def export(checkpoint, world_file, tmp_path, server):
    """A trained world checkpoint as two releases: its image tower in TeCoA's checkpoint dict,
    the whole model in open_clip's Hugging Face layout on the server."""
    from safetensors.torch import load_file, save_file

    from vlbench.models.victim import world_model_config

    trained = load_file(str(checkpoint))
    visual = {f"module.{k[len('visual.'):]}": v for k, v in trained.items() if k.startswith("visual.")}
    torch.save({"epoch": 1, "state_dict": {}, "add_prompter": None, "vision_encoder_state_dict": visual,
                "best_acc1": 0.0}, tmp_path / "TeCoAmodel_best.pth.tar")
    save_file(trained, str(tmp_path / "hub.safetensors"))
    server.repos["lab/world-fare"] = {"open_clip_config.json": json.dumps({"model_cfg": world_model_config()}).encode(),
                                      "open_clip_model.safetensors": (tmp_path / "hub.safetensors").read_bytes()}


def test_released_models_beside_a_trained_defense(tmp_path, capsys, monkeypatch, world_checkpoint_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # 1. vlbench trains tecoa and fare from the world CLIP (what the releases will be made of)
    trained = tmp_path / "trained.yaml"
    trained.write_text(yaml.safe_dump({**COMMON, "model": "world-quick", "out": str(tmp_path / "trained"),
                                       "attacks": ["none"], "datasets": ["world-colour"],
                                       "models": {"world-quick": {"arch": "vlbench-world", "format": "open_clip",
                                                                  "weights": {"path": str(world_checkpoint_path)}}},
                                       "defenses": [{"tecoa": TRAINING}, {"fare": TRAINING}]}))
    assert run(capsys, trained)[0] == 0
    checkpoints = {c["defense"]: c["model"]["checkpoint"] for c in cells(tmp_path / "trained")}
    with ModelServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        export(checkpoints["tecoa"], world_checkpoint_path, tmp_path, server)
        export_fare = tmp_path / "fare"
        export_fare.mkdir()
        export(checkpoints["fare"], world_checkpoint_path, export_fare, server)
        card = tmp_path / "models.yaml"
        card.write_text(yaml.safe_dump({"models": {
            "world-quick": {"arch": "vlbench-world", "format": "open_clip", "weights": {"path": str(world_checkpoint_path)},
                            "source": "tests/conftest.py (QUICK_WORLD)"},
            "tecoa-release": {"arch": "vlbench-world", "format": "tecoa", "towers": "visual", "base": "world-quick",
                              "weights": {"path": str(tmp_path / "TeCoAmodel_best.pth.tar")},
                              "source": "exported by the test", "paper": "Mao et al., ICLR 2023",
                              "claimed": [{"model": "vlbench-world", "dataset": "mean", "attack": "none", "eps": None,
                                           "metric": "top1", "value": 99.9, "source": "the test's own claim"}]},
            "fare-release": {"arch": "vlbench-world", "format": "open_clip_hf", "weights": {"hf_hub": "lab/world-fare"},
                             "source": "the test's hub"}}}))
        monkeypatch.setenv("VLBENCH_MODELS_FILE", str(card))
        assert main(["models", "fetch", "fare-release", "--no-progress"]) == 0
        server.repos.clear()  # nothing downloads at run time: the run reads the cache
        # 2. one folder: the world CLIP as it is, the two releases, and tecoa trained here
        zoo = tmp_path / "zoo.yaml"
        zoo.write_text(yaml.safe_dump({**COMMON, "model": "world-quick", "out": str(tmp_path / "zoo"), "defenses": [
            "none", {"name": "none", "base": "tecoa-release"}, {"name": "none", "base": "fare-release"},
            {"name": "tecoa", "label": "tecoa", "base": "world-quick", **TRAINING}]}))
        code, err = run(capsys, zoo)
    assert code == 0, err
    found = cells(tmp_path / "zoo")
    assert len(found) == 4 * 2 * 2
    assert {c["config"]["model"]["entry"] for c in found} == {"world-quick", "tecoa-release", "fare-release"}
    # a release gives the numbers of the model it was exported from, cell for cell
    metrics = {(c["defense"], c["attack"], c["dataset"]): c["metrics"] for c in found}
    for (label, attack, dataset), values in metrics.items():
        if label == "tecoa-release":
            assert values == metrics[("tecoa", attack, dataset)]
    released = {c["defense"]: c for c in found if c["attack"] == "none"}
    assert released["tecoa"]["model"]["reused"]  # trained in step 1 from the same base bits: its checkpoint
    assert released["tecoa-release"]["model"]["fingerprint"] == released["tecoa"]["model"]["fingerprint"]
    assert released["tecoa-release"]["base"]["fingerprint"] != released["none"]["base"]["fingerprint"]
    # every row says its model: architecture, base, where the weights came from
    page = (tmp_path / "zoo" / "leaderboard.html").read_text()
    markdown = (tmp_path / "zoo" / "leaderboard.md").read_text()
    for row, base in (("none", "world-quick"), ("tecoa-release", "tecoa-release"), ("fare-release", "fare-release"),
                      ("tecoa", "world-quick")):
        assert f'<span class="model">vlbench-world · {base}</span>' in page
        assert f"| {row}" in markdown.split("**Models**")[1]
    assert "hf-hub:lab/world-fare" in markdown and "TeCoAmodel_best.pth.tar (visual tower) on world-quick" in markdown
    section = page.split('id="defense-tecoa-release"')[1].split("</section>")[0]
    assert "the test&#x27;s own claim" in section and "below claimed" in section  # the release's own claims
    # 3. a rerun finds every cell done; another seed is another protocol: no merge
    code, err = run(capsys, zoo)
    assert code == 0 and "all 16 cells" in err
    assert run(capsys, zoo, "--seed", "1", "--out", str(tmp_path / "seed1"), "--defenses", "none")[0] == 0
    assert main(["leaderboard", str(tmp_path / "zoo"), str(tmp_path / "seed1"), "--out", str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "seed: 0 in" in error and not (tmp_path / "merged").exists()
    assert metrics_by_cell(tmp_path / "zoo")


def test_cells_are_keyed_by_the_weights_not_the_name(tmp_path, capsys, monkeypatch, world_checkpoint_path):
    """The same entry over other bytes plans other cells (the plan hashes the file; it loads no
    model)."""
    from safetensors.torch import load_file, save_file

    first = tmp_path / "a" / "world.safetensors"
    first.parent.mkdir()
    first.write_bytes(world_checkpoint_path.read_bytes())
    config = tmp_path / "c.yaml"

    def plan_ids():
        from vlbench.cli import build_parser, matrix_config
        from vlbench.run.matrix import make_plan

        config.write_text(yaml.safe_dump({**COMMON, "model": "mine", "out": str(tmp_path / "out"), "defenses": ["none"],
                                          "models": {"mine": {"arch": "vlbench-world", "format": "open_clip",
                                                              "weights": {"path": str(first)}}}}))
        return {c.id for c in make_plan(matrix_config(build_parser().parse_args(["run", "matrix", "--config", str(config)]))).cells}

    before = plan_ids()
    assert plan_ids() == before
    state = load_file(str(first))
    state["logit_scale"] = state["logit_scale"] + 0.5
    save_file(state, str(first))
    assert plan_ids().isdisjoint(before)
