"""The base model of every defense row: its model card entry, the identity that keys its
cells, what must be built before it exists, and the models themselves, loaded one at a time.

A row's base is its ``base:`` entry, else the config's ``model`` (and ``pretrained``): any
model card entry, the world CLIP, a released robust CLIP or a user's checkpoint alike. The
defense ``none`` on a base evaluates it as it is (a released model is such a row); a training
defense fine-tunes it. ``cfg`` below is a :class:`vlbench.run.matrix.MatrixConfig`.
"""

from __future__ import annotations

from typing import Any

from vlbench.models.card import ModelSpec, get_model, identity
from vlbench.models.factory import create_victim, named_model
from vlbench.models.victim import Victim
from vlbench.models.weights import fingerprint, locate


def row_model(cfg: Any, spec: Any) -> ModelSpec:
    """The base model entry of the defense row ``spec``."""
    if spec.base is not None:
        return get_model(spec.base, cfg.models)
    return named_model(cfg.model, cfg.pretrained, cfg.models)


def chain(model: ModelSpec, cfg: Any) -> list[ModelSpec]:
    """``model`` and the entries it is loaded onto (a visual or text release's base)."""
    found = [model]
    while found[-1].base is not None:
        found.append(get_model(found[-1].base, cfg.models))
    return found


def model_identity(model: ModelSpec, cfg: Any) -> dict[str, Any]:
    """What names ``model``'s weights in its rows' cell keys and records
    (:func:`vlbench.models.card.identity`); a missing file is a one-line error naming the
    fetch command."""
    base = model_identity(get_model(model.base, cfg.models), cfg) if model.base is not None else None
    return identity(model, fingerprint(model, cfg.precision), base)


def pending_builds(models: list[ModelSpec], cfg: Any) -> dict[str, Any]:
    """What must be built before these models exist (the world CLIP's pretraining), as
    ``{what: Work}`` for the plan."""
    builds = {}
    for model in {m.name: m for top in models for m in chain(top, cfg)}.values():
        if model.weights.kind == "build" and locate(model, cfg.precision).pending_build:
            builder = model.builder()
            builds[builder.what] = builder.work(cfg.precision)
    return builds


class BaseModels:
    """The rows' base models, each loaded when first asked for, one kept at a time (a zoo of
    ViT-L/14 releases would not fit in memory together); frozen, in eval mode."""

    def __init__(self, cfg: Any, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self._loaded: tuple[str, Victim] | None = None

    def get(self, model: ModelSpec) -> Victim:
        if self._loaded is None or self._loaded[0] != model.name:
            self._loaded = None  # drop the previous one before loading the next
            victim = create_victim(model, self.cfg.device, self.cfg.precision, self.cfg.models, self.progress)
            victim.requires_grad_(False)
            self._loaded = (model.name, victim)
        return self._loaded[1]

    def ready(self, model: ModelSpec) -> bool:
        """Whether ``model`` loads without building anything first."""
        return not any(m.weights.kind == "build" and locate(m, self.cfg.precision).pending_build
                       for m in chain(model, self.cfg))
