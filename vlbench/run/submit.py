"""Submitting a defense or an attack: the protocol's matrix with the plugin added, and the
submission folder a leaderboard merges (the cells, a submission record, the rendered page).

``vlbench submit PLUGIN.py|NAME`` first runs ``vlbench validate`` on it, so no compute is
spent on a plugin that breaks its contract. A defense is added to the protocol's defenses,
trained with its own parameters or, with ``--like LABEL``, with the training recipe of one of
the protocol's defenses (its steps, learning rate and training data) under its own
parameters' names; an attack is added to the protocol's attacks. With ``--baseline`` folders
(the protocol's committed results) only the new plugin's cells run, and the page merges them
with the baselines, whose settings must agree.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlbench import api
from vlbench.errors import UserError
from vlbench.reporting.leaderboard import SUBMISSION
from vlbench.run.matrix import MatrixConfig, PluginSpec, code_revision


def add_plugin(cfg: MatrixConfig, kind: str, name: str, options: dict[str, Any], like: str | None,
               only_new: bool) -> PluginSpec:
    """Add the submitted plugin to ``cfg`` (in place); with ``only_new`` the matrix keeps just
    the new plugin on its axis. Returns its entry."""
    specs = cfg.defenses if kind == "defenses" else cfg.attacks
    if like is not None:
        template = next((s for s in specs if s.label == like), None)
        if template is None:
            raise UserError(f"--like {like!r} is not one of the protocol's {kind}",
                            f"use one of: {', '.join(s.label for s in specs)}")
        known = {f.name for f in dataclasses.fields(api.registry_for(kind).get(name).Params)}
        # the template's keys the submitted plugin does not take (e.g. TeCoA's eps for a clean
        # recipe) are dropped: the recipe is shared, not the method's own parameters; the
        # submitter's own --set keys are kept, so a misspelt one is still an error
        options = {**{k: v for k, v in template.options.items() if k in known}, **options}
    spec = PluginSpec(name, name, options)
    if any(s.label == name for s in specs):
        raise UserError(f"the protocol already has a {kind[:-1]} labelled {name!r}",
                        "submit under another name, or to a protocol without it")
    if only_new:
        specs[:] = [spec] if kind == "defenses" else [PluginSpec("none", "none"), spec]
    else:
        specs.append(spec)
    return spec


def submission_record(kind: str, spec: PluginSpec, protocol: str, command: str, checks: list) -> dict[str, Any]:
    """The submission record (``submission.json``): what it is, its paper, version, parameters and claimed
    numbers, the code revision and protocol it ran under, and its validation."""
    cls = api.registry_for(kind).get(spec.name)
    built = cls.from_config(spec.name, spec.options)
    return {"name": spec.name, "kind": kind[:-1], "paper": cls.paper, "description": cls.description,
            "version": cls.version, "module": cls.__module__, "params": built.config()["params"],
            "claimed": list(getattr(cls, "claimed", ())), "code_revision": code_revision(), "protocol": protocol,
            "command": command, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "validate": [check.line() for check in checks]}


def write_submission(out: str | Path, record: dict[str, Any]) -> Path:
    from vlbench.store.files import atomic_write_json

    path = Path(out) / SUBMISSION
    atomic_write_json(path, record)
    return path
