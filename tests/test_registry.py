"""The generic registry: decorators, collisions, lazy entries, did-you-mean."""

import pytest

from vlbench.errors import UserError
from vlbench.registry import Registry, RegistryError, UnknownNameError


class Base:
    pass


def test_decorator_registers_and_returns_the_class():
    registry = Registry("widget", base=Base)

    @registry.register("alpha")
    class Alpha(Base):
        pass

    assert registry.get("alpha") is Alpha
    assert "alpha" in registry and registry.names() == ["alpha"]


def test_collision_names_both_origins():
    registry = Registry("widget")
    registry.register("alpha", object())
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("alpha", object())


def test_same_object_twice_is_not_a_collision():
    registry = Registry("widget")
    thing = object()
    registry.register("alpha", thing)
    registry.register("alpha", thing)
    assert registry.get("alpha") is thing


def test_unknown_name_suggests_close_matches():
    registry = Registry("attack")
    for name in ("pgd", "apgd-ce", "cw"):
        registry.register(name, object())
    with pytest.raises(UnknownNameError) as info:
        registry.get("pdg")
    assert isinstance(info.value, UserError)
    assert "did you mean 'pgd'" in str(info.value) and "known: apgd-ce, cw, pgd" in str(info.value)


def test_lazy_entry_imports_on_first_get():
    registry = Registry("thing")
    registry.register_lazy("dumps", "json:dumps")
    import json

    assert registry.get("dumps") is json.dumps


def test_lazy_entry_upgraded_by_real_object():
    import json

    registry = Registry("thing")
    registry.register_lazy("dumps", "json:dumps")
    registry.register("dumps", json.dumps)
    assert registry.get("dumps") is json.dumps


def test_base_class_is_enforced():
    registry = Registry("widget", base=Base)
    with pytest.raises(RegistryError, match="subclass of Base"):
        registry.register("bad", int)
