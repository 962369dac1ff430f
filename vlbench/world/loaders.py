"""Dataset loaders for the synthetic world: zero-shot classification and retrieval.

``world`` classifies one attribute (``options: {attribute: shape}``) of the scenes of a split;
``world_retrieval`` is an image-text retrieval gallery with five captions per image. Images
are rendered at 32×32, the world's native resolution, so the card's ``root`` and
``transform`` do not apply. Rendered splits are cached in memory: the five attribute tasks
over the same split share one rendering. Both read a text's meaning with the world's caption
parser (:func:`~vlbench.world.scenes.scene_from_caption`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

from vlbench.data.spec import DatasetSpec, LoadedSplit
from vlbench.errors import UserError
from vlbench.world.scenes import (ATTRIBUTES, SPLITS, TEMPLATES, Scene, describe, render, sample_scenes,
                                  scene_from_caption)

#: Images per classification split (test is what zero-shot tasks evaluate; defenses train on train).
DEFAULT_SIZES = {"test": 2000, "train": 10000}
#: Retrieval gallery size, as Flickr30k's 1k test images.
DEFAULT_GALLERY = 1000
RESOLUTION = 32
CAPTIONS_PER_IMAGE = 5


class WorldImages(Dataset):
    """Rendered world images with one integer target each (class index or image index)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, scenes: tuple[Scene, ...] | None = None):
        self.images = images
        self.targets = targets
        #: the scene graph of each image: the world's exact captioner reads it (N:N augmentation)
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def world_split(split: str, n: int, seed: int = 0,
                unique_attributes: bool = False) -> tuple[tuple[Scene, ...], torch.Tensor]:
    """The scenes of a split and their rendered images (cached; treat the tensor as read-only)."""
    return _rendered(split, int(n), int(seed), bool(unique_attributes))


@lru_cache(maxsize=8)
def _rendered(split: str, n: int, seed: int, unique_attributes: bool) -> tuple[tuple[Scene, ...], torch.Tensor]:
    # one positional signature, so every caller shares the same cache entry
    scenes = tuple(sample_scenes(split, n, seed, unique_attributes=unique_attributes))
    return scenes, render(scenes, RESOLUTION)


def _options(spec: DatasetSpec, default_n: int) -> tuple[int, int]:
    if spec.split not in SPLITS:
        raise UserError(f"dataset {spec.name!r} has split {spec.split!r}", f"use one of {SPLITS}")
    n, seed = spec.options.get("n", default_n), spec.options.get("seed", 0)
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"dataset {spec.name!r} has options.n = {n!r}", "give a positive integer")
    if not isinstance(seed, int):
        raise UserError(f"dataset {spec.name!r} has options.seed = {seed!r}", "give an integer")
    return n, seed


def load_world(spec: DatasetSpec, root=None, transform=None) -> LoadedSplit:
    """Zero-shot classification of ``spec.options['attribute']`` over a world split."""
    attribute = spec.options.get("attribute")
    if attribute not in ATTRIBUTES:
        raise UserError(f"dataset {spec.name!r} has options.attribute = {attribute!r}",
                        f"use one of {list(ATTRIBUTES)}")
    n, seed = _options(spec, DEFAULT_SIZES.get(spec.split, 2000))
    scenes, images = world_split(spec.split, n, seed)
    classes = ATTRIBUTES[attribute]
    labels = torch.tensor([classes.index(getattr(scene, attribute)) for scene in scenes])
    return LoadedSplit(images=WorldImages(images, labels), classnames=list(classes),
                       templates=list(TEMPLATES[attribute]), meaning=scene_from_caption)


def load_world_retrieval(spec: DatasetSpec, root=None, transform=None) -> LoadedSplit:
    """Image-text retrieval: a gallery of scenes with pairwise different attribute
    combinations, so each caption (all five attributes named) fits exactly one image."""
    n, seed = _options(spec, DEFAULT_GALLERY)
    scenes, images = world_split(spec.split, n, seed, unique_attributes=True)
    captions = [describe(scene, CAPTIONS_PER_IMAGE) for scene in scenes]
    return LoadedSplit(images=WorldImages(images, torch.arange(len(scenes)), scenes), captions=captions,
                       meaning=scene_from_caption)
