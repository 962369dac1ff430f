"""One generic registry type for every kind of component (defenses, attacks, dataset loaders).

Usage::

    attacks = Registry("attack")

    @attacks.register("pgd")
    class PGD(Attack): ...

    attacks.register_lazy("fancy", "my_pkg.fancy:FancyAttack", origin="entry point my-pkg")
    attacks.get("pgd")      # -> PGD
    attacks.get("pdg")      # UnknownNameError: unknown attack 'pdg'; did you mean 'pgd'? ...

A lazy entry is a ``"module:attribute"`` string or an ``importlib.metadata.EntryPoint``; it is
imported on first :meth:`Registry.get`, so heavy dependencies load only when used.
Registering a second, different object under a taken name is an error that names both
origins. Modelled on lm-evaluation-harness's ``lm_eval/api/registry.py``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any, Callable, Generic, Iterator, TypeVar

from vlbench.errors import UserError

T = TypeVar("T")


class RegistryError(Exception):
    """A programming error in how something was registered (e.g. a name collision)."""


class UnknownNameError(UserError, KeyError):
    """A name that is not registered; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass
class _Entry:
    target: Any  # the object, a "module:attr" string, or an EntryPoint
    origin: str
    loaded: bool


def _describe_origin(obj: Any) -> str:
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return getattr(obj, "__module__", repr(obj))


def import_target(target: str | EntryPoint) -> Any:
    if isinstance(target, EntryPoint):
        return target.load()
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


class Registry(Generic[T]):
    """A name → object mapping with decorator registration and lazy entries."""

    def __init__(self, kind: str, base: type | None = None, on_miss: Callable[[], None] | None = None):
        self.kind = kind
        self.base = base
        self._entries: dict[str, _Entry] = {}
        # Called once, the first time a name is missing: discovers entries that load lazily
        # (e.g. plugins), so lookups work without an explicit discovery step.
        self._on_miss = on_miss

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def decorate(target: T) -> T:
            self._add(name, _Entry(target, _describe_origin(target), loaded=True))
            return target

        return decorate(obj) if obj is not None else decorate

    def register_lazy(self, name: str, target: str | EntryPoint, origin: str | None = None) -> None:
        """Register a placeholder imported on first use."""
        self._add(name, _Entry(target, origin or str(target), loaded=False))

    def _add(self, name: str, entry: _Entry) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if entry.loaded:
            self._check_base(name, entry.target)
        existing = self._entries.get(name)
        if existing is not None and not self._same(existing, entry):
            raise RegistryError(
                f"{self.kind} name {name!r} is already registered by {existing.origin}; "
                f"{entry.origin} tried to register it again: rename one of them"
            )
        if existing is None or not existing.loaded:
            self._entries[name] = entry

    @staticmethod
    def _same(existing: _Entry, new: _Entry) -> bool:
        if existing.target is new.target:
            return True
        if existing.loaded and new.loaded:
            # The same class imported twice (e.g. a module loaded by path and by name).
            a, b = existing.target, new.target
            return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and \
                existing.origin == new.origin
        # A lazy placeholder may be upgraded by the real object it points to, and vice versa.
        return True

    def _check_base(self, name: str, obj: Any) -> None:
        if self.base is not None and not (inspect.isclass(obj) and issubclass(obj, self.base)):
            raise RegistryError(f"{self.kind} {name!r} must be a subclass of {self.base.__name__}")

    # -- lookup ---------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._on_miss is not None:
            discover, self._on_miss = self._on_miss, None
            discover()

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._discover()
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownNameError(self.unknown_message(name))
        if not entry.loaded:
            obj = import_target(entry.target)
            self._check_base(name, obj)
            entry.target, entry.loaded = obj, True
        return entry.target

    def unknown_message(self, name: str) -> str:
        return unknown_name(self.kind, name, self._entries)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._entries[name].origin

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def unknown_name(kind: str, name: str, known) -> str:
    """The message for a ``name`` that is not among ``known`` (a registry's, a card's, open_clip's
    architectures): the closest names, then every one."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown {kind} {name!r}; {hint}known: {', '.join(names) or '(none)'}"
