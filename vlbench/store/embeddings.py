"""A content-addressed on-disk cache for embeddings.

An entry's key is a JSON-able description of everything the tensor depends on (the model's
weight fingerprint, dataset, split, subset, transform, prompts); its file is
``<root>/<h[:2]>/<h>.safetensors`` with ``h`` the key's hash, and the full key is stored in the
file's metadata and checked on read. Writes are atomic. An entry that cannot be read (corrupt,
truncated) or whose stored key differs is recomputed and rewritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench.store.artifacts import artifact_key
from vlbench.store.files import atomic_save_tensors, stable_hash
from vlbench.store.paths import cache_dir

log = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root = Path(root) if root else cache_dir() / "embeddings"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path_for(self, key: dict[str, Any]) -> Path:
        digest = stable_hash(artifact_key(key), 32)
        return self.root / digest[:2] / f"{digest}.safetensors"

    def _read(self, path: Path, key_json: str) -> torch.Tensor | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key_json:
                    log.warning("cache entry %s belongs to another key; recomputing", path)
                    return None
                return handle.get_tensor("value")
        except Exception as exc:  # corrupt or truncated: recompute
            log.warning("unreadable cache entry %s (%s); recomputing", path, exc)
            return None

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return compute()
        path = self.path_for(key)
        key_json = json.dumps(key, sort_keys=True, default=str)
        if path.is_file():
            value = self._read(path, key_json)
            if value is not None:
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        atomic_save_tensors(path, {"value": value}, metadata={"key": key_json})
        return value
