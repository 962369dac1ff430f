"""The embedding cache: a second run reads instead of computing; damage is detected."""

import torch
from torch.utils.data import TensorDataset

from vlbench.data.datasets import DatasetSpec, EvalData
from vlbench.evaluation.context import EvalContext, cached_classifier, clean_image_embeddings
from vlbench.store.embeddings import EmbeddingCache


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value.clone()

    return compute, calls


def test_second_read_is_a_hit(tmp_path):
    cache = EmbeddingCache(tmp_path)
    compute, calls = counting(torch.arange(6.0).view(2, 3))
    first = cache.get_or_compute({"k": 1}, compute)
    second = cache.get_or_compute({"k": 1}, compute)
    assert torch.equal(first, second) and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_different_keys_do_not_collide(tmp_path):
    cache = EmbeddingCache(tmp_path)
    a = cache.get_or_compute({"k": 1}, lambda: torch.zeros(2))
    b = cache.get_or_compute({"k": 2}, lambda: torch.ones(2))
    assert not torch.equal(a, b)


def test_truncated_entry_is_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path)
    compute, calls = counting(torch.randn(4, 8))
    value = cache.get_or_compute({"k": "t"}, compute)
    path = cache.path_for({"k": "t"})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = cache.get_or_compute({"k": "t"}, compute)
    assert torch.equal(value, again) and len(calls) == 2
    assert torch.equal(cache.get_or_compute({"k": "t"}, compute), value) and len(calls) == 2


def test_garbage_entry_is_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path)
    compute, calls = counting(torch.randn(3))
    path = cache.path_for({"k": "g"})
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file at all")
    cache.get_or_compute({"k": "g"}, compute)
    assert len(calls) == 1 and cache.misses == 1


def test_embeddings_are_keyed_by_model_weights_and_subset(tmp_path, tiny_victim):
    images = torch.rand(10, 3, 32, 32)
    data = EvalData(DatasetSpec("toy", "classification", "toy"), TensorDataset(images, torch.arange(10) % 2),
                    ["cat", "dog"], ["a {c}."], None)
    cache = EmbeddingCache(tmp_path)
    ctx = EvalContext(tiny_victim, cache, batch_size=4, progress=False)
    first = clean_image_embeddings(ctx, data, list(range(10)))
    assert torch.allclose(first, tiny_victim.encode_image(images), atol=1e-5)
    clean_image_embeddings(ctx, data, list(range(10)))
    assert (cache.hits, cache.misses) == (1, 1)
    clean_image_embeddings(ctx, data, list(range(5)))   # another subset: another entry
    assert cache.misses == 2
    cached_classifier(ctx, data)
    cached_classifier(ctx, data)
    assert cache.hits == 2


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from vlbench.store.files import atomic_save_tensors, atomic_write_json

    atomic_write_json(tmp_path / "cell.json", {"a": 1})
    atomic_save_tensors(tmp_path / "weights.safetensors", {"w": torch.zeros(2)})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("cell.json", "weights.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_artifact_names_carry_the_schema_and_the_training_codes_version(monkeypatch, tmp_path):
    from vlbench.store import artifacts

    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path))
    key = {"model": "x", "config": {"steps": 3}}
    trained, _ = artifacts.artifact_path("checkpoints", key, trained=True, suffix=".safetensors")
    plain, full = artifacts.artifact_path("augment", key)
    embeddings = EmbeddingCache(tmp_path / "embeddings").path_for(key)
    assert trained.parent == tmp_path / "checkpoints" and full == {**key, "schema": artifacts.STORE_SCHEMA}
    monkeypatch.setattr(artifacts, "TRAINING_VERSION", "next")
    assert artifacts.artifact_path("checkpoints", key, trained=True, suffix=".safetensors")[0] != trained
    assert artifacts.artifact_path("augment", key)[0] == plain
    monkeypatch.setattr(artifacts, "RESULT_SCHEMA", 99)  # a cell's schema: cached files stay
    assert artifacts.artifact_path("augment", key)[0] == plain
    monkeypatch.setattr(artifacts, "STORE_SCHEMA", 99)
    assert artifacts.artifact_path("augment", key)[0] != plain
    assert EmbeddingCache(tmp_path / "embeddings").path_for(key) != embeddings
