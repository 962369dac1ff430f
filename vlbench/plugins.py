"""Plugin discovery: where defenses and attacks come from.

Three routes, in this order:

1. built-ins: every ``*.py`` file in the ``defenses/`` and ``attacks/`` folders;
2. installed packages: entry points in the groups ``vlbench.defenses`` and
   ``vlbench.attacks`` (``name = "package.module:Class"``, registered lazily under ``name``,
   or ``name = "package.module"``, imported so its decorators register);
3. single files named with ``--plugin path.py``.

A plugin that fails to import is reported with its error and skipped; the others still load
(the shape of submitit's ``core/plugins.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .paths import builtin_root

log = logging.getLogger(__name__)

ENTRY_POINT_GROUPS = {"defenses": "vlbench.defenses", "attacks": "vlbench.attacks"}


@dataclass
class PluginFailure:
    source: str
    error: str


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


_loaded_sources: set[str] = set()
failures: list[PluginFailure] = []


def _report(source: str, exc: BaseException) -> None:
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    failures.append(PluginFailure(source, error))
    warnings.warn(f"skipping plugin {source}: {error}", PluginWarning, stacklevel=3)


def import_file(path: Path, namespace: str = "vlbench_plugin") -> None:
    """Import a plugin file by path under a module name unique to that path."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"{namespace}_{path.stem}_{digest}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise


def _load_once(source: str, load) -> None:
    if source in _loaded_sources:
        return
    _loaded_sources.add(source)
    try:
        load()
    except Exception as exc:  # a broken plugin must not take the others down
        _report(source, exc)


def load_builtin(kind: str) -> None:
    folder = builtin_root() / kind
    for path in sorted(folder.glob("*.py")):
        if not path.name.startswith("_"):
            _load_once(str(path), lambda p=path: import_file(p, f"vlbench_builtin_{kind}"))


def load_entry_points(kind: str) -> None:
    from . import api

    registry = api.registry_for(kind)
    for ep in entry_points(group=ENTRY_POINT_GROUPS[kind]):
        source = f"entry point {ep.name} = {ep.value}"
        if ep.attr:
            _load_once(source, lambda ep=ep, s=source: registry.register_lazy(ep.name, ep, origin=s))
        else:
            _load_once(source, ep.load)


def load_files(paths: Iterable[str | Path]) -> None:
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file() or path.suffix != ".py":
            raise UserError(f"plugin file {path} does not exist or is not a .py file",
                            "pass --plugin path/to/plugin.py")
        _load_once(str(path.resolve()), lambda p=path: import_file(p))


def load_all(extra_files: Iterable[str | Path] = ()) -> None:
    """Load every route for both kinds (idempotent)."""
    for kind in ENTRY_POINT_GROUPS:
        load_builtin(kind)
        load_entry_points(kind)
    load_files(extra_files)
