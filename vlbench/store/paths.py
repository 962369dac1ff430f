"""Where vlbench keeps things: its cache directory and its built-in files.

The built-in files (``datasets.yaml``, ``configs/``) sit at the top of a source checkout; an
installed wheel carries them as ``vlbench/builtin/``.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # vlbench/


def builtin_root() -> Path:
    """The folder holding ``datasets.yaml`` and ``configs/``."""
    installed = _PACKAGE_DIR / "builtin"
    if (installed / "datasets.yaml").is_file():
        return installed
    return _PACKAGE_DIR.parent


def package_file(relative: str) -> Path:
    """A file shipped inside the vlbench package (the world's released weights)."""
    return _PACKAGE_DIR / relative


def cache_dir() -> Path:
    """The user cache: ``$VLBENCH_CACHE``, else ``$XDG_CACHE_HOME/vlbench``, else ``~/.cache/vlbench``."""
    explicit = os.environ.get("VLBENCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vlbench"


def card_file(name: str, variable: str) -> Path:
    """A card (``datasets.yaml``, ``models.yaml``): the file ``$variable`` names, else the built-in one."""
    return Path(os.environ.get(variable) or builtin_root() / name)
