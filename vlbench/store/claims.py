"""Claims: which process is computing what, for many processes sharing one results folder.

Before a worker computes a cell or trains a defense it takes a *claim*: a small JSON file
``<folder>/<name>.claim`` naming its owner (host, process id, a random token, when it started)
whose modification time is its heartbeat, refreshed by a background thread while the work
runs. Another worker that finds a live claim leaves that work alone and takes other work;
once the result is there it finds the work done. A claim is *stale*, and is taken over, when
its owner is a process of this host that no longer exists (a worker killed with SIGKILL, an
out-of-memory kill) or, for an owner on another host, whose heartbeat is older than the
lease (``VLBENCH_LEASE_SECONDS``, default 120 s): a dead node cannot be asked.

Taking, checking and taking over a claim happen under a short ``filelock`` lock on the
folder (``.claims.lock``), so two workers never both take the same claim; the lock file
stays (deleting a lock file races with the next process opening it). Releasing removes the claim only if it is still ours:
after a takeover the old owner, if it was merely slow, finds a foreign token and leaves the
new claim alone. The results themselves are written atomically (:mod:`vlbench.store.files`),
so even a worker that lost its claim while computing writes a complete, identical file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from vlbench.store.files import _alive, atomic_write_json

log = logging.getLogger(__name__)
SUFFIX = ".claim"


def lease_seconds() -> float:
    return float(os.environ.get("VLBENCH_LEASE_SECONDS", "120"))


@dataclass
class Owner:
    host: str
    pid: int
    token: str
    started: float
    what: str = ""
    log: str = ""

    @classmethod
    def here(cls, what: str, log_path: str = "") -> "Owner":
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time(), what, log_path)


@dataclass
class ClaimState:
    """A claim as found on disk: its owner, the heartbeat's age, and whether it is stale."""

    owner: Owner | None
    heartbeat_age: float
    stale: bool


def read_claim(path: Path) -> ClaimState | None:
    """The claim at ``path``, or None if there is none."""
    try:
        age = time.time() - path.stat().st_mtime
        raw = json.loads(path.read_text())
        owner = Owner(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # foreign content: only the heartbeat can tell whether its owner is alive
        age = time.time() - _mtime(path)
        return ClaimState(None, age, age > lease_seconds())
    if owner.host == socket.gethostname():
        stale = not _alive(owner.pid)
    else:
        stale = age > lease_seconds()
    return ClaimState(owner, age, stale)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class _Heartbeat:
    """One daemon thread per process that touches every claim this process holds."""

    def __init__(self) -> None:
        self._held: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, path: Path, token: str) -> None:
        with self._lock:
            self._held[path] = token
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="vlbench-claims", daemon=True)
                self._thread.start()

    def remove(self, path: Path) -> None:
        with self._lock:
            self._held.pop(path, None)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(0.5)
            if time.monotonic() - last < lease_seconds() / 4:
                continue
            last = time.monotonic()
            with self._lock:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass  # taken over or removed: release() will find out


_heartbeat = _Heartbeat()


class Claim:
    """A claim on one piece of work, taken with :meth:`take` and given back with :meth:`release`
    (or used as a context manager after a successful :meth:`take`)."""

    def __init__(self, folder: str | os.PathLike, name: str, what: str = "", log_path: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / f"{name}{SUFFIX}"
        self.what = what or name
        self.log_path = log_path
        self.owner: Owner | None = None

    def _mutex(self) -> FileLock:
        # one lock for the folder: claims are taken and released in milliseconds
        return FileLock(str(self.folder / ".claims.lock"), timeout=60)

    def take(self) -> bool:
        """Claim the work unless a live owner holds it; a stale claim is taken over."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._mutex():
            found = read_claim(self.path)
            if found is not None and not found.stale:
                return False
            if found is not None:
                who = f"{found.owner.host} pid {found.owner.pid}" if found.owner else "an unknown owner"
                log.warning("taking over %s from %s (heartbeat %.0f s old)", self.what, who, found.heartbeat_age)
            self.owner = Owner.here(self.what, self.log_path)
            atomic_write_json(self.path, vars(self.owner))
        _heartbeat.add(self.path, self.owner.token)
        return True

    def release(self) -> None:
        if self.owner is None:
            return
        _heartbeat.remove(self.path)
        with self._mutex():
            found = read_claim(self.path)
            if found is not None and found.owner is not None and found.owner.token == self.owner.token:
                self.path.unlink(missing_ok=True)
        self.owner = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def live_claims(folder: str | os.PathLike) -> dict[str, ClaimState]:
    """Every claim in ``folder`` that a live owner holds, by name."""
    found = {}
    for path in Path(folder).glob(f"*{SUFFIX}"):
        state = read_claim(path)
        if state is not None and not state.stale:
            found[path.name[: -len(SUFFIX)]] = state
    return found
