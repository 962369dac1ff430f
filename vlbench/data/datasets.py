"""Datasets: the ``datasets.yaml`` card, on-disk roots, transforms, loaders and subsets.

Every dataset is an entry in ``datasets.yaml``; its ``loader`` names a function in
:data:`loaders` that reads one on-disk format. A loader returns a :class:`LoadedSplit`:
a torch ``Dataset`` whose items are ``(image, target)`` with ``image`` a float tensor in
[0, 1] (C×H×W, already at the dataset's evaluation resolution) and ``target`` the class index
(classification) or the image index (retrieval), plus class names or captions when the
format carries them.

Roots: an entry's ``root`` is relative to the data root (``--data-root``, else
``$VLBENCH_DATA``, else ``<cache>/data``); ``--dataset-root NAME=PATH`` or
``$VLBENCH_ROOT_<NAME>`` (upper case, non-alphanumerics as ``_``) overrides one dataset.
Nothing is downloaded: a missing dataset raises :class:`DatasetMissing` naming the path and
where to get the data.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench.errors import UserError
from vlbench.registry import import_target, unknown_name
from vlbench.schema import from_mapping, read_card, read_once
from vlbench.store.files import stable_hash
from vlbench.store.paths import cache_dir, card_file

from .spec import TASKS, DatasetMissing, DatasetSpec, EvalData, LoadedSplit, env_root_variable, loaders  # noqa: F401  (the names users import from here)

# -- the card ---------------------------------------------------------------------------


def card_path() -> Path:
    return card_file("datasets.yaml", "VLBENCH_DATASETS_FILE")


def load_card(path: Path | None = None) -> dict[str, DatasetSpec]:
    path = Path(path) if path else card_path()
    specs = {}
    for name, entry in read_card(path, "datasets", "dataset card").items():
        spec = from_mapping(DatasetSpec, entry, f"dataset {name!r} in {path}", required=("task", "loader"),
                            name=str(name))
        if spec.task not in TASKS:
            raise UserError(f"dataset {name!r} has task {spec.task!r}", f"use one of {TASKS}")
        specs[str(name)] = spec
    return specs


def _specs() -> dict[str, DatasetSpec]:
    return read_once(card_path(), load_card)


def get_spec(name: str) -> DatasetSpec:
    specs = _specs()
    if name not in specs:
        raise UserError(unknown_name("dataset", name, specs), f"datasets are declared in {card_path()}")
    return specs[name]


def dataset_names() -> list[str]:
    return list(_specs())


# -- roots --------------------------------------------------------------------------------
#: ``NAME -> PATH`` overrides set from the command line
root_overrides: dict[str, Path] = {}


def data_root() -> Path:
    explicit = os.environ.get("VLBENCH_DATA")
    return Path(explicit).expanduser() if explicit else cache_dir() / "data"


def resolve_root(spec: DatasetSpec) -> Path:
    if spec.name in root_overrides:
        return Path(root_overrides[spec.name]).expanduser()
    env = os.environ.get(env_root_variable(spec.name))
    if env:
        return Path(env).expanduser()
    root = Path(spec.root or spec.name).expanduser()
    return root if root.is_absolute() else data_root() / root


# -- transforms ---------------------------------------------------------------------------
def _to_rgb(image):
    # A module-level function (not a lambda) keeps datasets picklable for spawned DataLoader workers.
    return image.convert("RGB")


def build_transform(spec: Any) -> Callable:
    """A PIL → [0,1] tensor transform from a card's ``transform`` value.

    ``native`` keeps the stored resolution (CIFAR 32 px, STL-10 96 px, as TeCoA attacks them);
    ``{resize: 256, crop: 224}`` is the TeCoA lineage's Resize(256) → CenterCrop(224).
    Normalisation never happens here: it belongs to the model, so epsilons stay in pixels.
    """
    from torchvision import transforms as T

    steps: list[Callable] = [_to_rgb]
    if spec in (None, "native"):
        pass
    elif isinstance(spec, dict) and set(spec) <= {"resize", "crop"}:
        if "resize" in spec:
            steps.append(T.Resize(int(spec["resize"]), interpolation=T.InterpolationMode.BICUBIC))
        if "crop" in spec:
            steps.append(T.CenterCrop(int(spec["crop"])))
    else:
        raise UserError(f"unknown transform {spec!r} in the dataset card",
                        "use 'native' or a mapping with 'resize' and/or 'crop'")
    steps.append(T.ToTensor())
    return T.Compose(steps)


# -- loading ------------------------------------------------------------------------------
def loader_for(spec: DatasetSpec) -> Callable[..., LoadedSplit]:
    """The loader a card entry names: a registered format, or ``module:function``."""
    from . import formats  # noqa: F401  (registers the loaders of the real formats)

    # the world's loaders are named "module:function" in the card, so this layer knows no
    # loader beyond the formats it ships
    return import_target(spec.loader) if ":" in spec.loader else loaders.get(spec.loader)


def load_dataset(name: str, split: str | None = None) -> EvalData:
    """Load the dataset named ``name`` from the card, through its registered loader.

    ``split`` overrides the card's evaluation split (defenses train on ``train``).
    """
    spec = get_spec(name)
    if split is not None and split != spec.split:
        spec = dataclasses.replace(spec, split=split)
    loaded = loader_for(spec)(spec, resolve_root(spec), build_transform(spec.transform))
    classnames = spec.classnames or loaded.classnames
    templates = spec.templates or loaded.templates
    if spec.task == "classification":
        if not classnames or not templates:
            raise UserError(f"dataset {name!r} has no class names or prompt templates",
                            "add classnames: and templates: to its card entry")
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise UserError(f"dataset {name!r} has templates without '{{c}}': {bad[0]!r}",
                            "write the class name slot as {c}")
    elif not loaded.captions:
        raise UserError(f"retrieval dataset {name!r} has no captions", "check its loader")
    return EvalData(spec, loaded.images, classnames, templates, loaded.captions, loaded.meaning)


def subset_indices(n_total: int, limit: int | None, seed: int) -> list[int]:
    """A seeded, fixed subset of ``limit`` indices (sorted), or all of them."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}", "pass a positive sample count")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=generator)[:limit].tolist())


def subset_hash(name: str, split: str, indices: list[int]) -> str:
    return stable_hash({"dataset": name, "split": split, "ids": indices})
