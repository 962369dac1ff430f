"""The world CLIP and world MLM shipped with the package: one set of bits for every user,
checked against the sha256 they were released with."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from vlbench.errors import UserError
from vlbench.models.card import get_model
from vlbench.store.paths import package_file
from vlbench.world.mlm import RELEASED_MLM
from vlbench.world.pretrain import QUALITY_BAR, RELEASED, RELEASED_CLIP, below_bar


def test_the_shipped_world_clip_is_the_card_entry_small_and_above_the_bar():
    path = package_file(RELEASED_CLIP)
    spec = get_model("world-clip")
    record = json.loads(path.with_suffix(".json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.weights.kind == "package" and spec.weights.sha256 == digest == record["sha256"]
    assert path.stat().st_size <= 25 * 10**6
    with safe_open(str(path), "pt") as handle:
        dtypes = {name: handle.get_tensor(name).dtype for name in handle.keys()}
    assert {d for n, d in dtypes.items() if "num_batches_tracked" not in n} == {torch.float16}
    assert below_bar(record["metrics"]) == [] and set(QUALITY_BAR) <= set(record["metrics"])
    assert record["command"].startswith("vlbench world pretrain --release")
    assert {"cpu", "cpu_capability", "torch"} <= set(record["machine"])


def test_the_shipped_world_clip_loads_as_the_float32_of_its_half_precision_tensors():
    from vlbench.world.pretrain import world_victim

    victim = world_victim()
    with safe_open(str(package_file(RELEASED_CLIP)), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    loaded = victim.model.state_dict()
    assert set(stored) == set(loaded)
    for name, tensor in stored.items():
        assert loaded[name].dtype == (torch.float32 if tensor.is_floating_point() else tensor.dtype)
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name


def test_below_bar_names_each_metric_under_it():
    good = {name: bar + 1 for name, bar in QUALITY_BAR.items()}
    assert below_bar(good) == []
    assert below_bar({**good, "t2i_R@1": 90.0}) == ["t2i_R@1 90.0 < 97"]


@pytest.fixture
def copied_release(tmp_path, monkeypatch):
    """The release copied to a folder the test may damage, found where the package's is."""
    import vlbench.models.weights as weights
    import vlbench.world.mlm as world_mlm

    shutil.copytree(package_file(RELEASED), tmp_path / RELEASED)
    for module in (weights, world_mlm):
        monkeypatch.setattr(module, "package_file", lambda relative: tmp_path / relative)
    return tmp_path / RELEASED


def test_a_changed_world_clip_file_is_refused_with_the_fix(copied_release):
    from vlbench.models.factory import create_victim
    from vlbench.models.weights import status

    clip = copied_release / "world-clip.safetensors"
    data = bytearray(clip.read_bytes())
    data[-1] ^= 1
    clip.write_bytes(bytes(data))
    spec = get_model("world-clip")
    assert status(spec).verified is False
    with pytest.raises(UserError, match="not the .* its entry declares") as raised:
        create_victim(spec)
    assert "reinstall vlbench" in str(raised.value)
    clip.unlink()
    with pytest.raises(UserError, match="missing from the installed vlbench"):
        create_victim(spec)


def test_the_world_mlm_is_read_from_the_release_and_checked(copied_release, monkeypatch):
    import attacks._mlm as attack_mlm
    import vlbench.world.mlm as mlm

    monkeypatch.setattr(attack_mlm, "_loaded", {})
    model = attack_mlm.load_masked_lm("world")
    ids, spans = model.word_pieces(["a", "red", "cube"])
    assert len(spans) == 3 and model.top_k(ids, 3)[1].shape == (len(ids), 3)
    assert mlm.released_world_mlm() == copied_release / "world-mlm"

    monkeypatch.setattr(attack_mlm, "_loaded", {})
    weights = copied_release / "world-mlm" / mlm.MLM_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match=r"differs from its record \(model.safetensors\)"):
        attack_mlm.load_masked_lm("world")
    (copied_release / "world-mlm" / mlm.MLM_RECORD).unlink()
    with pytest.raises(UserError, match="missing or unreadable"):
        attack_mlm.load_masked_lm("world")


def test_released_mlm_files_are_all_recorded():
    import vlbench.world.mlm as mlm

    folder = package_file(RELEASED_MLM)
    record = json.loads((folder / mlm.MLM_RECORD).read_text())
    assert record["sha256"] == mlm.release_manifest(folder)
    assert mlm.MLM_WEIGHTS in record["sha256"] and record["command"].startswith("vlbench world pretrain --release")


def test_a_release_is_refused_below_the_bar_and_written_whole_above_it(tmp_path, monkeypatch):
    """`vlbench world pretrain --release`'s function on tiny configs: a CLIP below the bar
    writes nothing; above it, the CLIP in float16 with its sidecar, and the MLM with every
    file's sha256."""
    import vlbench.world.mlm as mlm
    import vlbench.world.pretrain as pre

    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path / "cache"))
    quality = {"zero_shot_mean": 40.0, "i2t_R@1": 99.0, "t2i_R@1": 99.0}
    # the measurement itself is the matrix's (tested there); here, what the release does with it
    monkeypatch.setattr(pre, "evaluate_world", lambda victim: dict(quality))
    tiny = pre.PretrainConfig(steps=3, n_train=256, batch_size=32, warmup=1)
    tiny_mlm = mlm.WorldMLMConfig(steps=3, n_scenes=50, batch_size=16)
    folder = tmp_path / "released"
    with pytest.raises(UserError, match=r"below the release bar \(zero_shot_mean 40.0 < 97\)"):
        pre.release(folder, "test", progress=False, config=tiny, mlm_config=tiny_mlm)
    assert not (folder / "world-clip.safetensors").exists()

    quality["zero_shot_mean"] = 98.0
    record = pre.release(folder, "vlbench world pretrain --release", progress=False, config=tiny, mlm_config=tiny_mlm)
    clip = folder / "world-clip.safetensors"
    assert record["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert json.loads(clip.with_suffix(".json").read_text())["config"]["steps"] == 3
    written = json.loads((folder / "world-mlm" / mlm.MLM_RECORD).read_text())
    assert written["sha256"] == mlm.release_manifest(folder / "world-mlm") and mlm.MLM_WEIGHTS in written["sha256"]


def test_a_rebuilt_world_clip_is_an_entry_built_on_first_use(tmp_path, monkeypatch, capsys):
    """`weights: {build: ...}` in a config's models: the plan names the build, the run makes
    it once, its cells are keyed and recorded by the build's key, and a rerun builds nothing."""
    import yaml

    from vlbench.cli import main

    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "rebuilt.yaml"
    config.write_text(yaml.safe_dump({
        "model": "world-rebuilt", "limit": 20, "batch_size": 20, "out": str(tmp_path / "out"),
        "models": {"world-rebuilt": {"arch": "vlbench-world", "format": "open_clip",
                                     "weights": {"build": "world_builds:tiny_world"}}},
        "defenses": ["none"], "attacks": ["none"], "datasets": ["world-colour"]}))
    assert main(["run", "matrix", "--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "build: world CLIP pretraining ~" in printed.out + printed.err
    (cell,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cells").glob("*.json")]
    from world_builds import tiny_world

    assert cell["config"]["model"]["weights"] == tiny_world.key("fp32")
    assert cell["base"]["entry"] == "world-rebuilt" and tiny_world.path("fp32").is_file()
    assert main(["run", "matrix", "--config", str(config), "--no-progress"]) == 0
    assert "build:" not in capsys.readouterr().out
