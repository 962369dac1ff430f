"""Attacks built from other registered attacks (AutoAttack's ensemble, the multimodal
attacks' image and text stages): components are looked up in the registry by name, never
imported, and every result records each component's name and parameters."""

from __future__ import annotations

from typing import Any

from vlbench import api
from vlbench.errors import UserError


def build_component(owner: str, name: str, options: dict[str, Any], modality: str | None = None) -> api.Attack:
    cls = api.attacks.get(name)
    if modality and cls.modality != modality:
        raise UserError(f"{owner} needs a {modality} attack, but {name!r} is a {cls.modality} attack",
                        f"name a registered {modality} attack")
    return cls.from_config(name, options)
