"""Plugin discovery: built-in folders, entry points, single files; broken plugins are skipped."""

import re
import textwrap
from pathlib import Path

import pytest

from vlbench import api, plugins
from vlbench.cli import main

ATTACK_SOURCE = """
from dataclasses import dataclass
from vlbench.api import ImageAttack, attacks

@attacks.register({name!r})
class {cls}(ImageAttack):
    paper = "Test et al. 2026"
    description = "an attack from a {route}"
    version = "1"

    def perturb_images(self, victim, images, objective, generator):
        return images
"""


def test_builtins_are_discovered():
    api.discover()
    assert {"none", "pgd"} <= set(api.attacks.names())
    assert {"none", "vanilla"} <= set(api.defenses.names())


def test_single_file_plugin_via_cli(tmp_path, capsys):
    path = tmp_path / "my_attack.py"
    path.write_text(ATTACK_SOURCE.format(name="from-file", cls="FromFile", route="file"))
    try:
        assert main(["ls", "attacks", "--plugin", str(path)]) == 0
        out = capsys.readouterr().out
        assert "from-file" in out and "an attack from a file" in out and "pgd" in out
    finally:
        api.attacks.unregister("from-file")


def test_broken_file_is_reported_and_others_still_load(tmp_path, capsys):
    broken = tmp_path / "broken_attack.py"
    broken.write_text("import not_a_real_module_xyz\n")
    good = tmp_path / "good_attack.py"
    good.write_text(ATTACK_SOURCE.format(name="still-loads", cls="StillLoads", route="file"))
    try:
        with pytest.warns(plugins.PluginWarning, match="not_a_real_module_xyz"):
            assert main(["ls", "attacks", "--plugin", str(broken), "--plugin", str(good)]) == 0
        assert "still-loads" in capsys.readouterr().out
        assert any("broken_attack.py" in f.source for f in plugins.failures)
    finally:
        api.attacks.unregister("still-loads")


def test_missing_plugin_file_is_a_user_error(tmp_path, capsys):
    assert main(["ls", "attacks", "--plugin", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.py" in err


def _fake_distribution(root, entry_points: str, modules: dict[str, str]):
    dist = root / "fake_vlbench_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-vlbench-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)


def test_entry_point_plugins(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        """
        [vlbench.attacks]
        ep-attack = fake_ep_attack:EntryPointAttack
        ep-broken = fake_ep_missing_module:Nothing
        [vlbench.defenses]
        ep-module = fake_ep_defense_module
        ep-module-broken = fake_ep_defense_broken
        """,
        {
            # A class entry point is registered lazily under the entry point's name.
            "fake_ep_attack": "from vlbench.api import ImageAttack\n"
                              "class EntryPointAttack(ImageAttack):\n"
                              "    paper = 'EP 2026'\n    description = 'via entry point'\n    version = '1'\n",
            # A module entry point registers itself with the decorator when imported.
            "fake_ep_defense_module": "from vlbench.api import Defense, defenses\n"
                                      "@defenses.register('ep-defense')\n"
                                      "class EPDefense(Defense):\n    trains = False\n    version = '1'\n",
            "fake_ep_defense_broken": "raise RuntimeError('this plugin is broken')\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.warns(plugins.PluginWarning, match="this plugin is broken"):
            plugins.load_entry_points("defenses", api.defenses)
        plugins.load_entry_points("attacks", api.attacks)
        assert "ep-defense" in api.defenses
        cls = api.attacks.get("ep-attack")
        assert cls.__name__ == "EntryPointAttack" and cls.description == "via entry point"
        with pytest.raises(ModuleNotFoundError):
            api.attacks.get("ep-broken")
    finally:
        for name in ("ep-attack", "ep-broken"):
            api.attacks.unregister(name)
        api.defenses.unregister("ep-defense")


def test_unknown_plugin_parameter_is_a_user_error():
    from vlbench.errors import UserError

    with pytest.raises(UserError, match="no parameter 'epss'.*did you mean 'eps'"):
        api.build("attacks", "pgd", {"epss": 4})
    with pytest.raises(UserError, match="eps=300.0/255 is out of range"):
        api.build("attacks", "pgd", {"eps": 300})
    with pytest.raises(UserError, match="must be int"):
        api.build("attacks", "pgd", {"steps": "ten"})


def test_parameters_are_checked_against_their_types_all_the_way_down():
    from dataclasses import dataclass, field
    from typing import Literal

    from vlbench.api import coerce_params
    from vlbench.errors import UserError

    @dataclass
    class Params:
        name: str | None = None
        weights: list[float] = field(default_factory=list)
        pair: tuple[int, str] = (0, "")
        mode: Literal["mean", "max"] = "mean"
        table: dict[str, int] = field(default_factory=dict)

    def build(**options):
        return coerce_params(Params, options, "attack 'x'")

    assert build(name="a").name == "a" and build(name=None).name is None
    weights = build(weights=(1, 2.5)).weights
    assert weights == [1.0, 2.5] and type(weights) is list and all(type(w) is float for w in weights)
    assert build(pair=[1, "b"]).pair == (1, "b")
    assert build(mode="max").mode == "max" and build(table={"a": 1}).table == {"a": 1}
    for options, message in [
        ({"name": 3}, "parameter 'name' must be str | None, got 3"),
        ({"weights": ["a"]}, "parameter 'weights' must be list[float], got ['a']"),
        ({"weights": [True]}, "must be list[float]"),
        ({"pair": [1, 2]}, "must be tuple[int, str]"),
        ({"pair": [1]}, "must be tuple[int, str]"),
        ({"mode": "median"}, "parameter 'mode' must be 'mean' | 'max', got 'median'"),
        ({"table": {"a": "1"}}, "must be dict[str, int]"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            build(**options)


def test_the_readme_plugin_example_runs_and_records_its_budget(tmp_path, capsys, world_checkpoint_path):
    import json

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    source = readme.split("```python\n# my_attack.py\n", 1)[1].split("```", 1)[0]
    plugin = tmp_path / "my_attack.py"
    plugin.write_text(source)
    common = ["run", "matrix", "--plugin", str(plugin), "--defenses", "none", "--datasets", "world-colour",
              "--limit", "60", "--pretrained", str(world_checkpoint_path), "--no-progress"]
    try:
        assert main([*common, "--attacks", "none,fgsm", "--out", str(tmp_path / "out")]) == 0
        cells = {c["attack"]: c for c in (json.loads(p.read_text()) for p in (tmp_path / "out" / "cells").glob("*.json"))}
        assert cells["fgsm"]["config"]["attack"]["threat_model"] == {"modality": "image", "norm": "Linf",
                                                                     "eps": 4 / 255, "eps_255": 4.0}
        assert cells["fgsm"]["metrics"]["top1"] < cells["none"]["metrics"]["top1"]
        config = tmp_path / "big.yaml"
        config.write_text("attacks: [{fgsm: {eps: 300}}]\n")
        capsys.readouterr()
        assert main([*common, "--config", str(config), "--out", str(tmp_path / "big")]) == 2
        assert "eps=300.0/255 is out of range" in capsys.readouterr().err
        assert main(["validate", str(plugin), "--pretrained", str(world_checkpoint_path)]) == 0
        assert capsys.readouterr().out.strip().endswith("all 11 checks passed or n/a")
    finally:
        api.attacks.unregister("fgsm")


def _builtin_package(root, name: str, modules: dict[str, str]) -> None:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)


def test_builtins_register_lazily_and_import_their_helpers(tmp_path, monkeypatch):
    helper = "from vlbench.api import ImageAttack\nclass Base(ImageAttack):\n    paper = 'helper'\n"
    plugin = ("from ._base import Base\nfrom vlbench.api import attacks\n"
              "@attacks.register('lazy-one')\nclass LazyOne(Base):\n    description = 'uses its helper'\n")
    _builtin_package(tmp_path, "vlbench_test_attacks", {"_base": helper, "lazy_one": plugin})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(plugins.BUILTIN_PACKAGES, "attacks", "vlbench_test_attacks")
    monkeypatch.setattr(plugins, "_loaded_sources", set())
    import sys

    try:
        plugins.load_builtin("attacks", api.attacks)
        assert "lazy-one" in api.attacks and "vlbench_test_attacks.lazy_one" not in sys.modules
        cls = api.attacks.get("lazy-one")
        assert cls.paper == "helper" and cls.__module__ == "vlbench_test_attacks.lazy_one"
    finally:
        api.attacks.unregister("lazy-one")


@pytest.mark.parametrize("source, error", [
    ("from vlbench.api import attacks\n@attacks.register('broken-one')\nclass Broken(:\n", SyntaxError),
    ("import not_a_real_module_xyz\nfrom vlbench.api import attacks, ImageAttack\n"
     "@attacks.register('broken-one')\nclass Broken(ImageAttack):\n    pass\n", ModuleNotFoundError),
])
def test_a_broken_builtin_is_an_error_with_its_traceback(tmp_path, monkeypatch, source, error):
    package = f"vlbench_broken_attacks_{error.__name__}"
    _builtin_package(tmp_path, package, {"broken_one": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(plugins.BUILTIN_PACKAGES, "attacks", package)
    monkeypatch.setattr(plugins, "_loaded_sources", set())
    try:
        with pytest.raises(error) as raised:
            plugins.load_builtin("attacks", api.attacks)
            api.attacks.get("broken-one")
        assert "broken_one.py" in "".join(str(entry.path) for entry in raised.traceback) + str(raised.value)
    finally:
        api.attacks.unregister("broken-one")


def test_importing_vlbench_and_listing_names_imports_no_plugin():
    import subprocess
    import sys

    code = ("import sys, vlbench.api as api; names = api.attacks.names() + api.defenses.names(); "
            "print(len(names), sorted(m for m in sys.modules if m.startswith(('attacks.', 'defenses.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 15 and out[1].strip() == "[]"


def test_prepare_builds_a_plugin_from_its_parameters(capsys):
    assert main(["prepare", "attack", "pgd", "--set", "eps=2", "--set", "steps=3"]) == 0
    assert capsys.readouterr().out.strip() == "attack pgd: ready"
    assert main(["prepare", "attack", "pgd", "--set", "eps=300"]) == 2
    assert "eps=300.0/255 is out of range" in capsys.readouterr().err
    assert main(["prepare", "defense", "nn", "--set", "augment"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
