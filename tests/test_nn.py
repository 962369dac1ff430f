"""N:N: EDA rewrites, the world's generators, the augmentation bank's alignment filter and
statistics, and MAT training (both encoders, resumable through the shared trainer)."""

import copy
import dataclasses
import random

import pytest
import torch

from defenses.nn.bank import AugmentConfig, build_bank, cached_bank
from defenses.nn.eda import eda
from defenses.nn.generators import WorldCaptioner, WorldPainter
from vlbench import api
from vlbench.data.datasets import EvalData, get_spec, loader_for
from vlbench.evaluation.words import split_words
from vlbench.training.loop import TrainingRun


def is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


def test_eda_operations_do_what_wei_and_zou_define():
    """Wei & Zou, EMNLP 2019, §2.1: each operation on its own, over many seeds."""
    from defenses.nn.eda import SYNONYMS

    text = "a small red circle on a striped background"
    words = split_words(text)
    for seed in range(50):
        rng = random.Random(seed)
        replaced = split_words(eda(text, "sr", rng, alpha=0.3))
        changed = [(a, b) for a, b in zip(words, replaced) if a != b]
        assert len(replaced) == len(words) and 1 <= len(changed) <= 2
        assert all(b in SYNONYMS[a] for a, b in changed)

        inserted = split_words(eda(text, "ri", rng))
        assert len(inserted) == len(words) + 1
        extra = list(inserted)
        for word in words:
            extra.remove(word)
        assert any(extra[0] in SYNONYMS[w] for w in words if w in SYNONYMS)

        swapped = split_words(eda(text, "rs", rng))
        assert sorted(swapped) == sorted(words)
        assert sum(a != b for a, b in zip(words, swapped)) in (0, 2)   # one swap (of equal words: none)

        deleted = split_words(eda(text, "rd", rng, alpha=0.5))
        assert 1 <= len(deleted) <= len(words) and is_subsequence(deleted, words)
    # deletion with p = 0.5 over 8 words removes some word on almost every seed
    assert sum(len(split_words(eda(text, "rd", random.Random(s), alpha=0.5))) < len(words) for s in range(50)) >= 45
    with pytest.raises(ValueError):
        eda(text, "xx", random.Random(0))


@pytest.fixture(scope="module")
def small_retrieval():
    """24 training scenes of the world's retrieval task."""
    spec = dataclasses.replace(get_spec("world-retrieval"), split="train", options={"n": 24})
    loaded = loader_for(spec)(spec, None, None)
    return EvalData(spec, loaded.images, None, None, loaded.captions)


def test_world_generators_are_exact(small_retrieval):
    from vlbench.world.scenes import scene_from_caption

    scenes = small_retrieval.images.scenes
    captions = WorldCaptioner(scenes).caption(None, [0, 1], 3, random.Random(0))
    assert all(len(c) == 3 for c in captions)
    for row, texts in zip([0, 1], captions):
        for text in texts:
            named = scene_from_caption(text)
            assert all(getattr(scenes[row], k) == v for k, v in named.items()) and named
        # a captioner's captions are new pairs, not the ground-truth captions again
        assert not set(texts) & set(small_retrieval.captions[row])
    drawn = WorldPainter().draw(small_retrieval.captions[0][:2], (32, 32), random.Random(0))
    assert drawn.shape == (2, 3, 32, 32) and 0 <= drawn.min() and drawn.max() <= 1


def test_bank_filters_by_alignment_and_reports_every_pool(world_victim, small_retrieval):
    loose = build_bank(world_victim, small_retrieval, AugmentConfig(margin=10.0, per_pool=1), progress=False)
    strict = build_bank(world_victim, small_retrieval, AugmentConfig(margin=-10.0, per_pool=1), progress=False)
    assert set(loose.stats) == {"captions", "eda", "captioner", "crop", "flip", "randaugment", "painter"}
    assert all(s["kept_fraction"] == 1.0 for s in loose.stats.values())
    assert all(s["kept_fraction"] == 0.0 for s in strict.stats.values())
    assert len(strict.images) == 0 and all(t == [] for t in strict.texts)
    assert len(loose.images) == len(loose.image_owner) > 0 and loose.images.dtype == torch.uint8
    for pool, stats in loose.stats.items():
        assert stats["generated"] > 0 and -1 <= stats["alignment"] <= 1 and 0 <= stats["diversity"] <= 2, pool


def test_bank_is_cached(world_victim, small_retrieval):
    config = AugmentConfig(per_pool=1, text_pools=("eda",), image_pools=("flip",))
    first, folder = cached_bank(world_victim, small_retrieval, config, progress=False)
    second, again = cached_bank(world_victim, small_retrieval, config, progress=False)
    assert folder == again and first.texts == second.texts and torch.equal(first.images, second.images)


@pytest.mark.parametrize("augment", [["none"], pytest.param(["captions", "eda", "flip", "painter"],
                                                            marks=pytest.mark.slow)])
def test_nn_trains_both_encoders(world_victim, augment, monkeypatch):
    victim = copy.deepcopy(world_victim)
    defense = api.build("defenses", "nn", {"train_datasets": ["world-retrieval"], "steps": 2, "batch_size": 8,
                                           "warmup": 0, "lr": 1e-4, "augment": augment, "per_pool": 1,
                                           "text_attack": "deepwordbug", "text_params": {"budget": 1}})
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    summary = defense.fit(victim, TrainingRun(progress=False))
    changed = {k for k, v in victim.model.state_dict().items() if not torch.equal(v, before[k])}
    assert "logit_scale" in changed
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)
    assert ("augmentation" in summary) == (augment != ["none"])


def test_nn_rejects_unknown_pools_and_classification_data():
    from vlbench.errors import UserError

    with pytest.raises(UserError, match="unknown augmentation pools"):
        api.build("defenses", "nn", {"augment": ["mixup"]})


def test_augmented_nn_identity_follows_the_bank_revision(monkeypatch):
    import sys

    plain = api.build("defenses", "nn", {"augment": ["none"]}).config()
    nn_module = sys.modules[type(api.build("defenses", "nn", {})).__module__]
    augmented = api.build("defenses", "nn", {"augment": ["all"]}).config()
    monkeypatch.setattr(nn_module, "BANK_REVISION", nn_module.BANK_REVISION + 1)
    # plain MAT draws no bank, so a new bank revision must not retrain or re-evaluate it
    assert api.build("defenses", "nn", {"augment": ["none"]}).config() == plain
    assert api.build("defenses", "nn", {"augment": ["all"]}).config() != augmented


def test_bank_does_not_depend_on_how_rows_are_chunked(world_victim, small_retrieval):
    config = AugmentConfig(per_pool=2, text_pools=("eda", "captioner"), image_pools=("crop", "flip"))
    whole = build_bank(world_victim, small_retrieval, config, progress=False)
    pieces = build_bank(world_victim, small_retrieval, config, progress=False, chunk=3)
    assert whole.texts == pieces.texts
    assert torch.equal(whole.images, pieces.images) and torch.equal(whole.image_owner, pieces.image_owner)
    for pool, stats in whole.stats.items():
        assert stats["generated"] == pieces.stats[pool]["generated"] > 0
        assert stats["kept_fraction"] == pieces.stats[pool]["kept_fraction"]


def test_the_bank_command_rejects_bad_input_in_one_line(capsys):
    from defenses.nn.__main__ import main

    assert main(["--pools", "eda,mixup"]) == 2
    assert main(["--dataset", "world-shape"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "unknown augmentation pools ['mixup']" in errors[0] and "world-shape is a classification dataset" in errors[1]
