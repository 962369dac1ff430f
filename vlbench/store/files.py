"""Atomic file writes, locks between processes, and content hashing.

Every result, cache entry and checkpoint is written to a temporary file in the destination
folder, flushed to disk and renamed into place, so a reader (or a process killed midway)
never sees a half-written file. A temporary file's name says which host and process own it,
so that cleaning up after a killed run never removes a file another live run is writing;
every write cleans up its folder that way.
What two processes must not build at the same time (a defense's training, with its partial
checkpoints) is built under :func:`file_lock`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_TEMP_SUFFIX = ".tmp"
log = logging.getLogger(__name__)
T = TypeVar("T")


def _owner_tag() -> str:
    return f"{socket.gethostname().replace('.', '-')}-{os.getpid()}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a writer killed mid-write (SIGKILL, out of memory) left its temporary here; the next
    # write to the folder removes it (never one of a live process)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); a result is as readable as any file the user writes
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:  # a killed process its parent has not reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(folder: str | os.PathLike, max_age_hours: float = 24.0) -> int:
    """Delete the temporary files of writes that died in ``folder``: those of a process of this
    host that no longer exists, and any older than ``max_age_hours`` (another host's process
    cannot be asked). Returns how many were removed."""
    host = socket.gethostname().replace(".", "-")
    removed = 0
    for temp in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        parts = temp.name.split(".")
        owner = parts[-3] if len(parts) >= 4 else ""
        owner_host, _, pid = owner.rpartition("-")
        try:
            age_hours = (time.time() - temp.stat().st_mtime) / 3600
        except FileNotFoundError:
            continue  # its writer just renamed it into place
        dead = owner_host == host and pid.isdigit() and not _alive(int(pid))
        if dead or age_hours > max_age_hours:
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed; never deleted, since deleting a
    lock file races with the next process opening it). Another process asking for the same
    lock waits; the kernel releases it if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process %s (lock %s)", what or "holding the lock", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(lock: str | os.PathLike, cached: Callable[[], T | None], build: Callable[[], T], what: str) -> T:
    """What ``cached()`` finds; else ``build()`` it under ``lock``, so that of several processes
    sharing a cache one builds and the others wait and then find its result."""
    found = cached()
    if found is not None:
        return found
    with file_lock(lock, what):
        found = cached()  # built by the process we waited for
        return found if found is not None else build()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of ``obj``'s canonical JSON: equal inputs give equal hashes across runs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def tensor_fingerprint(tensors: dict[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
                       length: int = 16) -> str:
    """A sha256 over names, shapes, dtypes and bytes of a state dict."""
    digest = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, tensor in sorted(items, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:length]
