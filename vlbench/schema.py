"""Values read from YAML or the command line, checked against the type hints of the
dataclass they fill: plugin parameters, matrix configs and dataset card entries.

One checker for all three, so that ``limit: "200"``, ``eps: [4]`` or ``options: null`` is
the same kind of one-line error wherever it is written.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from vlbench.errors import UserError


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
