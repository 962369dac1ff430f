"""What a dataset is: its card entry (:class:`DatasetSpec`), what a loader returns
(:class:`LoadedSplit`), a dataset ready for evaluation (:class:`EvalData`), and the registry of
loaders, one per on-disk format (see :mod:`vlbench.data.datasets` for the card and loading)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench.errors import UserError
from vlbench.registry import Registry
from vlbench.store.files import stable_hash


def env_root_variable(name: str) -> str:
    return "VLBENCH_ROOT_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


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
    """What a loader returns. ``meaning``, when the format has one, parses a text (a class
    prompt or caption) to what it states, compared with ``==`` (see :class:`EvalData`)."""

    images: torch.utils.data.Dataset
    classnames: list[str] | None = None
    captions: list[list[str]] | None = None
    templates: list[str] | None = None
    meaning: Callable[[str], Any] | None = None


@dataclass
class EvalData:
    """A dataset ready for evaluation: images plus class prompts or captions.

    ``meaning`` is the dataset's parser from a text to what it states (the world's
    :func:`~vlbench.world.scenes.scene_from_caption`), or None: text attacks constrained
    to keep the meaning of what they edit need it.
    """

    spec: DatasetSpec
    images: torch.utils.data.Dataset
    classnames: list[str] | None
    templates: list[str] | None
    captions: list[list[str]] | None
    meaning: Callable[[str], Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task(self) -> str:
        return self.spec.task

    def __len__(self) -> int:
        return len(self.images)


