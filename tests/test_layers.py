"""The core's layering (``[tool.importlinter]`` in pyproject.toml): vlbench never imports a
built-in plugin, no layer imports a higher one, and no import cycles inside vlbench."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def import_cycles(package: str) -> list[str]:
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # a package's __init__ importing its own submodule is not a cycle of concerns
            if imported.startswith(module + "."):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=imported, imported=module)
                                          or (imported, module)) + f" -> {imported}")
    return cycles


def test_no_import_cycles_inside_vlbench():
    cycles = import_cycles("vlbench")
    assert cycles == [], "\n".join(cycles)


def test_the_checks_catch_a_violation(tmp_path):
    """The contracts are live: a lower layer importing a higher one, and a cycle, are found."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from layered import high\n")
    (package / "high.py").write_text("from layered import low\n")
    (tmp_path / ".importlinter").write_text("[importlinter]\nroot_package = layered\n"
                                            "[importlinter:contract:1]\nname = layers\ntype = layers\n"
                                            "layers =\n    layered.high\n    layered.low\n")
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        assert import_cycles("layered")
    finally:
        sys.path.remove(str(tmp_path))
