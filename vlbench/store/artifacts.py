"""The content-addressed artifact store: where every cached thing lives, named by a hash of
everything that produced it.

Result cells, the world CLIP, the world masked LM, defense checkpoints, N:N augmentation
banks and embeddings all take their names from :func:`artifact_key`, which adds a schema
(the result cells', or the store's for cached files) to the caller's key (and, for trained
artifacts, the version of the training code),
so a change to what a file means never reuses a file written before it. Builds go through
:func:`vlbench.store.files.build_once`, so processes sharing the store build each artifact once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbench.store.files import stable_hash
from vlbench.store.paths import cache_dir

#: the layout and meaning of result cells; bump on any change to it (3: per-sample outcomes)
RESULT_SCHEMA = 3
#: the layout and meaning of cached files (embeddings, checkpoints, the world CLIP and MLM,
#: banks); bump on any change to it. Apart from the cells' since 3, so a change to what a
#: cell records does not retrain every model
STORE_SCHEMA = 2

#: the version of the training code (loop, sampling, checkpointing) behind every trained
#: artifact: bump when a change to it changes trained weights
TRAINING_VERSION = "1"


def artifact_key(key: dict[str, Any], trained: bool = False) -> dict[str, Any]:
    """``key`` with the store's schema, and the training code's version for a trained artifact."""
    return {**key, "schema": STORE_SCHEMA, **({"training_code": TRAINING_VERSION} if trained else {})}


def cell_key(key: dict[str, Any], trained: bool = False) -> dict[str, Any]:
    """A result cell's ``key``: with the cells' schema, and the training code's version when
    the cell's model was trained."""
    return {**artifact_key(key, trained), "schema": RESULT_SCHEMA}


def artifact_path(kind: str, key: dict[str, Any], *, trained: bool = False, prefix: str = "",
                  suffix: str = "", digits: int = 20) -> tuple[Path, dict[str, Any]]:
    """Where the artifact of ``kind`` named by ``key`` lives in the cache, and its full key."""
    full = artifact_key(key, trained)
    return cache_dir() / kind / f"{prefix}{stable_hash(full, digits)}{suffix}", full


def without_versions(config: Any) -> Any:
    """A plugin config without its ``version`` fields (nested components' too): what the
    plugin is asked to do, apart from which code does it."""
    if isinstance(config, dict):
        return {k: without_versions(v) for k, v in config.items() if k != "version"}
    if isinstance(config, list):
        return [without_versions(v) for v in config]
    return config
