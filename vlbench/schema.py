"""Values read from YAML or the command line, checked against the type hints of the
dataclass they fill: plugin parameters, matrix configs, dataset and model card entries.

One reader (:func:`read_yaml`) and one checker (:func:`check_type`, and
:func:`from_mapping` for a whole dataclass) for all of them, so that ``limit: "200"``,
``eps: [4]`` or ``options: null`` is the same kind of one-line error wherever it is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from vlbench.errors import UserError

T = TypeVar("T")


def read_yaml(path: str | Path, what: str) -> Any:
    """``yaml.safe_load`` a file, turning every failure into a one-line :class:`UserError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}", "check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"malformed YAML in {what} {path}{where}: {problem}",
                        "fix the syntax (indentation, colons, quotes)") from None


def read_card(path: Path, key: str, what: str) -> dict:
    """The ``key:`` mapping of the card file ``path`` (``datasets.yaml``, ``models.yaml``)."""
    raw = read_yaml(path, what)
    if not isinstance(raw, dict) or not isinstance(raw.get(key), dict):
        raise UserError(f"{what} {path} has no '{key}:' mapping", f"see the top of the shipped {Path(path).name}")
    return raw[key]


_read: dict[tuple[Any, Path], Any] = {}


def read_once(path: Path, load: Callable[[Path], T]) -> T:
    """``load(path)``, once per process for each loader and path (a card read by every lookup;
    pointing ``VLBENCH_*_FILE`` at another file reads that one)."""
    key = (load, Path(path))
    if key not in _read:
        _read[key] = load(Path(path))
    return _read[key]


def from_mapping(cls: type[T], raw: Any, what: str, *, required: tuple[str, ...] = (),
                 skip: tuple[str, ...] = (), **fixed: Any) -> T:
    """The dataclass ``cls`` filled from the mapping ``raw``: an unknown or missing key, or a
    value of the wrong type, is a one-line :class:`UserError` naming ``what``. Keys in
    ``skip`` are the caller's to read; ``fixed`` fields are given, not read."""
    if not isinstance(raw, dict):
        raise UserError(f"{what} must be a mapping, got {raw!r}", "write it as key: value lines")
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(map(str, raw)) - known - set(skip))
    if unknown:
        raise UserError(f"{what} has unknown keys {unknown}", f"use only {sorted(known)}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise UserError(f"{what} lacks {missing[0]!r}", f"add a {missing[0]}: line")
    hints = typing.get_type_hints(cls)
    values = {key: check_type(value, hints[key], f"{what}: {key!r}") for key, value in raw.items()
              if key not in skip}
    return cls(**values, **fixed)


class _Mismatch(Exception):
    """A value does not fit a type hint (caught and turned into one :class:`UserError`)."""


def check_type(value: Any, hint: Any, what: str) -> Any:
    """``value`` as ``hint`` wants it (see :func:`_fit`), or a one-line :class:`UserError`
    that names ``what``, the type and the value."""
    try:
        return _fit(value, hint)
    except _Mismatch:
        raise UserError(f"{what} must be {type_name(hint)}, got {value!r}", "fix the value in the config") from None


def type_name(hint: Any) -> str:
    """``list[float]``, ``str | None``, ``'a' | 'b'``: a hint as a config author reads it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))


def _fit(value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` all the way down, the way YAML spells it: an int is
    a float, a list or tuple is a list or tuple, one string is a one-item list; nothing else
    converts (``"200"`` is not an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        # True == 1 in Python, so compare the type too
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return _fit(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint in (list, tuple) or origin in (list, tuple):
        kind = origin or hint
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if kind is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            return tuple(_fit(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return kind(_fit(v, item) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key, item = args if args else (Any, Any)
        return {_fit(k, key): _fit(v, item) for k, v in value.items()}
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch


# -- claimed numbers ---------------------------------------------------------------------
#: the keys of a claimed number (Defense.claimed, a model card entry's or a submission's claimed)
CLAIM_KEYS = ("model", "dataset", "attack", "eps", "metric", "value", "source")
CLAIM_OPTIONAL = ("pretrained", "params")
#: a claim's dataset when it is the mean over the classification datasets
MEAN = "mean"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A number a paper or a release reports: its setting (base model, optionally the
    pretrained weights and the defense parameters, dataset or ``mean``, attack and epsilon in
    1/255, metric), the value in % and the source it was read from."""

    model: str
    dataset: str
    attack: str
    eps: float | None
    metric: str
    value: float
    source: str
    pretrained: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, raw: Any, owner: str) -> "Claim":
        if not isinstance(raw, dict):
            raise UserError(f"{owner}: a claimed number must be a mapping, not {raw!r}",
                            f"give each claim the keys {', '.join(CLAIM_KEYS)}")
        missing = [k for k in CLAIM_KEYS if k not in raw]
        unknown = sorted(set(raw) - set(CLAIM_KEYS) - set(CLAIM_OPTIONAL))
        if missing or unknown:
            problem = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}"
            raise UserError(f"{owner}: the claim {raw!r} {problem}",
                            f"give each claim the keys {', '.join(CLAIM_KEYS)} (optional: {', '.join(CLAIM_OPTIONAL)})")
        try:
            value = float(raw["value"])
            eps = None if raw["eps"] is None else float(raw["eps"])
        except (TypeError, ValueError):
            raise UserError(f"{owner}: the claim {raw!r} has a value or eps that is not a number",
                            "write value in % and eps in 1/255 (null when clean)") from None
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"{owner}: the claim's params {params!r} is not a mapping", "write params: {eps: 4}")
        return cls(str(raw["model"]), str(raw["dataset"]), str(raw["attack"]), eps, str(raw["metric"]), value,
                   str(raw["source"]), None if raw.get("pretrained") is None else str(raw["pretrained"]),
                   tuple(sorted(params.items())))

    def setting(self) -> str:
        model = self.model + (f" ({self.pretrained})" if self.pretrained else "")
        attack = "clean" if self.attack == "none" else self.attack + (f" ε={self.eps:g}/255" if self.eps is not None
                                                                       else "")
        params = "".join(f", {k}={v}" for k, v in self.params)
        dataset = "mean over the classification datasets" if self.dataset == MEAN else self.dataset
        return f"{model}{params}: {dataset}, {attack}, {self.metric}"


def parse_claims(raw: Any, owner: str) -> list[Claim]:
    """A ``claimed:`` list, each entry checked (one-line errors naming ``owner``)."""
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{owner}: claimed must be a list of claims, not {type(raw).__name__}",
                        "write claimed: [{model: ..., dataset: ..., ...}]")
    return [Claim.from_dict(item, owner) for item in raw]
