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
from vlbench.world.pretrain import QUALITY_BAR, RELEASED, RELEASED_CLIP, RELEASED_MLM, below_bar


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
    import vlbench.store.paths as paths

    shutil.copytree(package_file(RELEASED), tmp_path / RELEASED)
    monkeypatch.setattr(paths, "package_file", lambda relative: tmp_path / relative)
    monkeypatch.setattr(weights, "package_file", lambda relative: tmp_path / relative)
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
    import attacks._mlm as mlm

    monkeypatch.setattr(mlm, "_loaded", {})
    model = mlm.load_masked_lm("world")
    ids, spans = model.word_pieces(["a", "red", "cube"])
    assert len(spans) == 3 and model.top_k(ids, 3)[1].shape == (len(ids), 3)
    assert mlm.released_world_mlm() == copied_release / "world-mlm"

    monkeypatch.setattr(mlm, "_loaded", {})
    weights = copied_release / "world-mlm" / mlm.MLM_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match=r"differs from its record \(model.safetensors\)"):
        mlm.load_masked_lm("world")
    (copied_release / "world-mlm" / mlm.MLM_RECORD).unlink()
    with pytest.raises(UserError, match="missing or unreadable"):
        mlm.load_masked_lm("world")


def test_released_mlm_files_are_all_recorded():
    import attacks._mlm as mlm

    folder = package_file(RELEASED_MLM)
    record = json.loads((folder / mlm.MLM_RECORD).read_text())
    assert record["sha256"] == mlm.release_manifest(folder)
    assert mlm.MLM_WEIGHTS in record["sha256"] and record["command"].startswith("vlbench world pretrain --release")
