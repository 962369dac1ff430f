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
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .errors import UserError
from .io import stable_hash
from .paths import builtin_root, cache_dir
from .registry import Registry
from .schema import check_type

TASKS = ("classification", "retrieval")

#: loader name -> ``fn(spec, root: Path, transform) -> LoadedSplit``
loaders: Registry[Callable[..., "LoadedSplit"]] = Registry("dataset loader")


class DatasetMissing(UserError):
    """A dataset's files are not where the card says."""

    def __init__(self, name: str, path: Path, source: str | None, what: str = "files"):
        env = env_root_variable(name)
        super().__init__(
            f"dataset {name!r} not found: expected {what} at {path}",
            f"get it from {source or 'its publisher'} and put it there, or point "
            f"--dataset-root {name}=PATH (or ${env}) at it",
        )


@dataclass
class DatasetSpec:
    """One ``datasets.yaml`` entry."""

    name: str
    task: str
    loader: str
    root: str | None = None
    split: str = "test"
    transform: Any = "native"
    classnames: list[str] | None = None
    templates: list[str] | None = None
    source: str | None = None
    reference: str | None = None
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def transform_id(self) -> str:
        return stable_hash(self.transform, 8)


@dataclass
class LoadedSplit:
    """What a loader returns."""

    images: torch.utils.data.Dataset
    classnames: list[str] | None = None
    captions: list[list[str]] | None = None
    templates: list[str] | None = None


@dataclass
class EvalData:
    """A dataset ready for evaluation: images plus class prompts or captions."""

    spec: DatasetSpec
    images: torch.utils.data.Dataset
    classnames: list[str] | None
    templates: list[str] | None
    captions: list[list[str]] | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task(self) -> str:
        return self.spec.task

    def __len__(self) -> int:
        return len(self.images)


# -- the card ---------------------------------------------------------------------------
_FIELDS = set(DatasetSpec.__dataclass_fields__) - {"name"}
_HINTS = typing.get_type_hints(DatasetSpec)


def card_path() -> Path:
    return Path(os.environ.get("VLBENCH_DATASETS_FILE") or builtin_root() / "datasets.yaml")


def read_yaml(path: Path, what: str) -> Any:
    """``yaml.safe_load`` a file, turning every failure into a one-line :class:`UserError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}",
                        "check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {what} {path}{where}: {problem}",
                        "fix the syntax (indentation, colons, quotes)") from None


def load_card(path: Path | None = None) -> dict[str, DatasetSpec]:
    path = Path(path) if path else card_path()
    raw = read_yaml(path, "dataset card")
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
        raise UserError(f"dataset card {path} has no 'datasets:' mapping",
                        "see the top of the shipped datasets.yaml for the format")
    specs = {}
    for name, entry in raw["datasets"].items():
        if not isinstance(entry, dict):
            raise UserError(f"dataset {name!r} in {path} is not a mapping", "give it task/loader keys")
        unknown = set(entry) - _FIELDS
        if unknown:
            raise UserError(f"dataset {name!r} in {path} has unknown keys {sorted(unknown)}",
                            f"use only {sorted(_FIELDS)}")
        for key in ("task", "loader"):
            if key not in entry:
                raise UserError(f"dataset {name!r} in {path} lacks {key!r}", f"add a {key}: line")
        if entry["task"] not in TASKS:
            raise UserError(f"dataset {name!r} has task {entry['task']!r}", f"use one of {TASKS}")
        values = {key: check_type(value, _HINTS[key], f"dataset {name!r} in {path}: {key!r}")
                  for key, value in entry.items()}
        specs[str(name)] = DatasetSpec(name=str(name), **values)
    return specs


_card_cache: dict[Path, dict[str, DatasetSpec]] = {}


def _specs() -> dict[str, DatasetSpec]:
    path = card_path()
    if path not in _card_cache:
        _card_cache[path] = load_card(path)
    return _card_cache[path]


def get_spec(name: str) -> DatasetSpec:
    specs = _specs()
    if name not in specs:
        holder = Registry("dataset")
        for known in specs:
            holder.register_lazy(known, "builtins:object")
        raise UserError(holder.unknown_message(name), f"datasets are declared in {card_path()}")
    return specs[name]


def dataset_names() -> list[str]:
    return list(_specs())


# -- roots --------------------------------------------------------------------------------
#: ``NAME -> PATH`` overrides set from the command line
root_overrides: dict[str, Path] = {}


def env_root_variable(name: str) -> str:
    return "VLBENCH_ROOT_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


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
def load_dataset(name: str, split: str | None = None) -> EvalData:
    """Load the dataset named ``name`` from the card, through its registered loader.

    ``split`` overrides the card's evaluation split (defenses train on ``train``).
    """
    from . import builtin_loaders  # noqa: F401  (registers the loaders of the real formats)
    from .world import loaders as _world_loaders  # noqa: F401  (registers the world loaders)

    spec = get_spec(name)
    if split is not None and split != spec.split:
        spec = dataclasses.replace(spec, split=split)
    loader = loaders.get(spec.loader)
    loaded = loader(spec, resolve_root(spec), build_transform(spec.transform))
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
    return EvalData(spec, loaded.images, classnames, templates, loaded.captions)


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
