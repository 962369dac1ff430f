"""The synthetic world: scenes, renderer, captions, loaders, the tiny CLIP's config and pretraining."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest
import torch

from vlbench.world import scenes as world
from vlbench.world.scenes import (ATTRIBUTES, TEMPLATES, Scene, describe, random_caption, render, sample_scenes,
                                  scene_for, scene_from_caption)


# -- scenes ---------------------------------------------------------------------------------------
def test_attributes_and_templates_are_complete():
    assert set(ATTRIBUTES) == {"shape", "colour", "size", "position", "texture"}
    assert set(TEMPLATES) == set(ATTRIBUTES)
    for name, classes in ATTRIBUTES.items():
        assert len(classes) >= 3 and len(set(classes)) == len(classes)
        assert len(TEMPLATES[name]) >= 3 and all("{c}" in t for t in TEMPLATES[name])


def test_sampling_is_deterministic_by_split_n_and_seed():
    assert sample_scenes("train", 50, seed=3) == sample_scenes("train", 50, seed=3)
    assert sample_scenes("train", 50, seed=3) != sample_scenes("train", 50, seed=4)
    assert sample_scenes("test", 20) == sample_scenes("test", 40)[:20]
    with pytest.raises(ValueError):
        sample_scenes("validation", 5)


def test_train_and_test_are_disjoint():
    train = sample_scenes("train", 5000)
    test = sample_scenes("test", 1000)
    assert not {s.key() for s in train} & {s.key() for s in test}
    assert all(world.split_of(s) == "train" for s in train)
    assert all(world.split_of(s) == "test" for s in test)
    # every attribute value occurs in both splits
    for name, classes in ATTRIBUTES.items():
        assert {getattr(s, name) for s in test} == set(classes)


def test_unique_attribute_sampling_gives_distinct_combinations():
    gallery = sample_scenes("test", 300, unique_attributes=True)
    assert len({tuple(s.attributes().values()) for s in gallery}) == 300


def test_render_range_shape_and_determinism():
    scenes = sample_scenes("test", 64, seed=1)
    images = render(scenes)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, render(scenes))
    # an image depends only on its scene, not on the batch it is rendered in
    assert torch.equal(images[5:9], render(scenes[5:9]))
    assert render(scenes[:2], size=64).shape == (2, 3, 64, 64)


def test_attributes_change_the_pixels():
    scene = sample_scenes("test", 1)[0]
    image = render([scene])[0]
    for name, classes in ATTRIBUTES.items():
        other = next(c for c in classes if c != getattr(scene, name))
        changed = scene_for({**scene.attributes(), name: other}, random.Random(0))
        assert not torch.allclose(render([changed])[0], image), name


def test_rendering_twenty_thousand_scenes_takes_seconds():
    import time

    scenes = sample_scenes("train", 20000)
    started = time.perf_counter()
    render(scenes)
    assert time.perf_counter() - started < 20


# -- captions -----------------------------------------------------------------------------------
def test_descriptions_are_distinct_and_parse_back():
    for scene in sample_scenes("test", 40, seed=2):
        captions = describe(scene, 5)
        assert len(set(captions)) == 5
        for caption in captions:
            assert scene_from_caption(caption) == scene.attributes(), caption


def test_random_captions_are_true_of_their_scene_and_deterministic():
    scenes = sample_scenes("train", 200)
    first = [random_caption(s, random.Random(i)) for i, s in enumerate(scenes)]
    assert first == [random_caption(s, random.Random(i)) for i, s in enumerate(scenes)]
    for scene, caption in zip(scenes, first):
        named = scene_from_caption(caption)
        assert named and all(scene.attributes()[k] == v for k, v in named.items()), caption


def test_zero_shot_prompts_parse_to_their_class():
    for name, classes in ATTRIBUTES.items():
        for value in classes:
            for template in TEMPLATES[name]:
                assert scene_from_caption(template.format(c=value)) == {name: value}


def test_scene_from_caption_then_render_is_a_text_to_image_generator():
    caption = "A large blue star in the bottom right on a dotted background."
    attributes = scene_from_caption(caption)
    assert attributes == {"shape": "star", "colour": "blue", "size": "large",
                          "position": "bottom right", "texture": "dotted"}
    scene = scene_for(attributes, random.Random(0))
    assert isinstance(scene, Scene) and scene.attributes() == attributes
    assert render([scene]).shape == (1, 3, 32, 32)
    assert scene_from_caption("nothing to see here") == {}


# -- loaders -------------------------------------------------------------------------------------
def test_classification_loaders_through_the_registry():
    from vlbench.data.datasets import load_dataset

    for name in ATTRIBUTES:
        data = load_dataset(f"world-{name}")
        assert data.classnames == list(ATTRIBUTES[name])
        assert data.templates == TEMPLATES[name]
        assert len(data) == 2000
        image, label = data.images[7]
        assert image.shape == (3, 32, 32) and 0 <= label < len(data.classnames)
    shape, colour = load_dataset("world-shape"), load_dataset("world-colour")
    assert shape.images.images is colour.images.images  # one rendering serves every task


def test_retrieval_loader_has_five_identifying_captions_per_image():
    from vlbench.data.datasets import load_dataset

    data = load_dataset("world-retrieval")
    assert len(data) == 1000 and len(data.captions) == 1000
    assert all(len(c) == 5 for c in data.captions)
    image, index = data.images[123]
    assert image.shape == (3, 32, 32) and index == 123
    # no caption string belongs to two images
    strings = [c for captions in data.captions for c in captions]
    assert len(set(strings)) == len(strings)


def test_loader_options_are_checked():
    from vlbench.data.datasets import DatasetSpec
    from vlbench.errors import UserError
    from vlbench.world.loaders import load_world

    small = load_world(DatasetSpec("w", "classification", "world", split="train",
                                   options={"attribute": "size", "n": 10}))
    assert len(small.images) == 10
    with pytest.raises(UserError):
        load_world(DatasetSpec("w", "classification", "world", options={"attribute": "smell"}))


# -- the tiny CLIP ------------------------------------------------------------------------------
TINY = dict(steps=3, n_train=256, batch_size=32, warmup=1)


def test_model_config_registers_and_creates():
    import open_clip

    from vlbench.models.victim import WORLD_MODEL, register_model_configs

    register_model_configs()
    register_model_configs()
    assert WORLD_MODEL in open_clip.list_models()
    model = open_clip.create_model(WORLD_MODEL).eval()
    tokens = open_clip.get_tokenizer(WORLD_MODEL)(["a red circle."])
    size = model.visual.image_size
    assert model.encode_text(tokens).shape[-1] == model.encode_image(torch.rand(1, 3, size, size)).shape[-1]


def test_pretraining_is_deterministic():
    from vlbench.world.pretrain import PretrainConfig, pretrain

    first = pretrain(PretrainConfig(**TINY), progress=False)
    second = pretrain(PretrainConfig(**TINY), progress=False)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = pretrain(PretrainConfig(**{**TINY, "seed": 1}), progress=False)
    assert not all(torch.equal(first[k], other[k]) for k in first)



def test_pretraining_captions_say_class_names_alone_until_the_text_tower_trains():
    from vlbench.world.pretrain import PretrainConfig, Pretraining
    from vlbench.world.scenes import SYNONYMS

    synonyms = {word for words in SYNONYMS.values() for word in words}

    def synonyms_in(run, step):
        _, captions, _ = run.batch(step)
        return sum(word.strip(".,") in synonyms for caption in captions for word in caption.split())

    run = Pretraining(PretrainConfig(**{**TINY, "batch_size": 64, "plain_caption_steps": 2}))
    assert synonyms_in(run, 0) == synonyms_in(run, 1) == 0
    assert synonyms_in(run, 2) > 0 and synonyms_in(run, 3) > 0

def test_world_checkpoint_is_cached_and_rebuilt_when_truncated(tmp_path, monkeypatch):
    import json

    import open_clip

    from vlbench.models.victim import WORLD_MODEL
    from vlbench.world import pretrain as pre

    monkeypatch.setenv("VLBENCH_CACHE", str(tmp_path))
    calls = []
    real = pre.pretrain
    monkeypatch.setattr(pre, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = pre.PretrainConfig(**TINY)
    path = pre.world_checkpoint(config, progress=False)
    assert path.parent == tmp_path / "world" and path.suffix == ".safetensors"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config"] == asdict(config)
    assert {"world-shape", "zero_shot_mean", "i2t_R@1", "t2i_R@1"} <= set(sidecar["metrics"])
    assert pre.world_checkpoint(config) == path and len(calls) == 1
    # the quality metrics were checked above; the rebuilds below need not measure them again
    monkeypatch.setattr(pre, "evaluate_world", lambda victim: sidecar["metrics"])

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert pre.world_checkpoint(config, progress=False) == path and len(calls) == 2
    assert path.read_bytes() == data  # deterministic retraining
    model = open_clip.create_model(WORLD_MODEL, pretrained=str(path), weights_only=True)
    assert model.visual.preprocess_cfg["mean"]

    pre.world_checkpoint(config, force=True, progress=False)
    assert len(calls) == 3
    other = pre.world_checkpoint(pre.PretrainConfig(**{**TINY, "seed": 5}), progress=False)
    assert other != path
