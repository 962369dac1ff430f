"""The content-addressed artifact store: where every cached thing lives, named by a hash of
everything that produced it.

Result cells, the world CLIP, the world masked LM, defense checkpoints, N:N augmentation
banks and embeddings all take their names from :func:`artifact_key`, which adds the result
schema to the caller's key (and, for trained artifacts, the version of the training code),
so a change to what a file means never reuses a file written before it. Builds go through
:func:`vlbench.store.files.build_once`, so processes sharing the store build each artifact once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbench.store.files import stable_hash
from vlbench.store.paths import cache_dir

#: the layout and meaning of result cells and cached files; bump on any change to either
RESULT_SCHEMA = 2

#: the version of the training code (loop, sampling, checkpointing) behind every trained
#: artifact: bump when a change to it changes trained weights
TRAINING_VERSION = "1"


def artifact_key(key: dict[str, Any], trained: bool = False) -> dict[str, Any]:
    """``key`` with the schema, and the training code's version for a trained artifact."""
    return {**key, "schema": RESULT_SCHEMA, **({"training_code": TRAINING_VERSION} if trained else {})}


def artifact_path(kind: str, key: dict[str, Any], *, trained: bool = False, prefix: str = "",
                  suffix: str = "", digits: int = 20) -> tuple[Path, dict[str, Any]]:
    """Where the artifact of ``kind`` named by ``key`` lives in the cache, and its full key."""
    full = artifact_key(key, trained)
    return cache_dir() / kind / f"{prefix}{stable_hash(full, digits)}{suffix}", full
