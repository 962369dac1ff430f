"""Plugin discovery: where defenses and attacks come from.

Three routes, in this order:

1. built-ins: the modules of the ``defenses`` and ``attacks`` packages, each imported by its
   module name (so a built-in may import helpers beside it). They are indexed without being
   imported: each module's source is parsed for its ``@attacks.register("name")`` /
   ``@defenses.register("name")`` decorators and every name is registered lazily as
   ``module:Class``, so ``import vlbench`` and ``vlbench ls`` import no plugin, and a run
   imports only the plugins it uses. A module whose names cannot be read that way is imported
   at once. Modules named ``_*`` are helpers, not plugins;
2. installed packages: entry points in the groups ``vlbench.defenses`` and
   ``vlbench.attacks`` (``name = "package.module:Class"``, registered lazily under ``name``,
   or ``name = "package.module"``, imported so its decorators register);
3. single files named with ``--plugin path.py``.

A third-party plugin (entry point or file) that fails to import is reported with its error and
skipped; the others still load (the shape of submitit's ``core/plugins.py``). A broken built-in
is a bug in vlbench, not the user's input: its error propagates with its traceback.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from vlbench.errors import UserError
from vlbench.registry import Registry

ENTRY_POINT_GROUPS = {"defenses": "vlbench.defenses", "attacks": "vlbench.attacks"}
#: the packages holding the built-in plugins, by kind: imported by name, never statically
BUILTIN_PACKAGES = {"defenses": "defenses", "attacks": "attacks"}


@dataclass
class PluginFailure:
    source: str
    error: str


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


_loaded_sources: set[str] = set()
failures: list[PluginFailure] = []
#: the names the built-in packages register, by kind
builtin_names: dict[str, set[str]] = {"defenses": set(), "attacks": set()}


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


def registered_names(source: str, filename: str, registry_name: str) -> list[tuple[str, str, int]]:
    """``(name, class, line)`` for every ``@<registry_name>.register("name")`` class decorator
    in ``source``; a syntax error propagates, naming the file and line."""
    found = []
    for node in ast.parse(source, filename).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "register" and isinstance(decorator.func.value, ast.Name)
                    and decorator.func.value.id == registry_name and decorator.args
                    and isinstance(decorator.args[0], ast.Constant) and isinstance(decorator.args[0].value, str)):
                found.append((decorator.args[0].value, node.name, node.lineno))
    return found


def builtin_modules(kind: str) -> list[tuple[str, Path]]:
    """``(module name, source file)`` of every built-in plugin of ``kind``, helpers excluded."""
    package = importlib.import_module(BUILTIN_PACKAGES[kind])
    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        folder = Path(info.module_finder.path)
        path = folder / info.name / "__init__.py" if info.ispkg else folder / f"{info.name}.py"
        modules.append((f"{package.__name__}.{info.name}", path))
    return modules


def load_builtin(kind: str, registry: Registry) -> None:
    source = f"built-in {kind}"
    if source in _loaded_sources:
        return
    for module, path in builtin_modules(kind):
        names = registered_names(path.read_text(), str(path), kind)
        if not names:  # registered some other way: the module itself must run to tell
            importlib.import_module(module)
        for name, cls, line in names:
            registry.register_lazy(name, f"{module}:{cls}", origin=f"{path}:{line}")
            builtin_names[kind].add(name)
    _loaded_sources.add(source)


def load_entry_points(kind: str, registry: Registry) -> None:
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


def load_all(registries: dict[str, Registry], extra_files: Iterable[str | Path] = ()) -> None:
    """Load every route into ``registries`` (kind -> registry; idempotent)."""
    for kind, registry in registries.items():
        load_builtin(kind, registry)
        load_entry_points(kind, registry)
    load_files(extra_files)
