"""``vlbench models fetch``: the one place vlbench downloads weights, verified before use.

Hugging Face sources (``hf_hub`` entries and open_clip tags) go through ``huggingface_hub``
into the standard cache (``$HF_HOME/hub``; ``HF_ENDPOINT`` names a mirror), where open_clip
and transformers find them too; it resumes an interrupted transfer from its ``.incomplete``
file. A URL is downloaded into ``<vlbench cache>/models/.partial/`` with ``Range`` requests
(a cut transfer resumes, or restarts if the server ignores the range), checked against the
entry's sha256, refused if it is a web page (as Google Drive answers for large files), and
only then moved into ``models/url/``. A file whose sha256 differs from its entry's is deleted,
from the Hugging Face cache too, and the fetch stops with one line: nothing unverified is left
where a run would read it.

Run time never downloads: ``vlbench`` sets ``HF_HUB_OFFLINE=1`` when imported (see
:mod:`vlbench`), and only :func:`fetch` lifts it, for its own calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlbench.errors import UserError
from vlbench.models.card import ModelSpec
from vlbench.models.weights import HubFiles, hub_cache, hub_files, hub_location, locate, sha256_of, url_path
from vlbench.monitor.progress import progress as progress_bar
from vlbench.store.paths import cache_dir

CHUNK = 1 << 20


@dataclass
class Fetched:
    """What a fetch did for one entry."""

    name: str
    path: Path
    size: int
    verified: bool | None   # None: the entry declares no sha256
    sha256: str
    action: str             # "downloaded", "already here", "built", "local"

    def line(self) -> str:
        check = ("sha256 verified" if self.verified else "UNVERIFIED: the entry declares no sha256; this file's is "
                 f"{self.sha256} (check it against the publisher, then add it to the entry)"
                 if self.verified is None else "sha256 mismatch")
        return f"{self.name}: {self.action}, {self.size / 2**20:.1f} MB at {self.path}; {check}"


def fetch(spec: ModelSpec, precision: str = "fp32", progress: bool = True,
          report: Callable[[str], None] = lambda line: None) -> Fetched:
    """Put ``spec``'s weights where :func:`vlbench.models.weights.locate` finds them."""
    kind = spec.weights.kind
    if kind == "build":
        path = spec.builder().build(precision, progress)
        return Fetched(spec.name, path, path.stat().st_size, None, sha256_of(path), "built")
    if kind == "package":
        return _done(spec, locate(spec, precision).files[0], "shipped with vlbench")
    if kind == "path":
        if not spec.local_path().exists():
            raise UserError(f"{spec.name} has no download address: place its file at {spec.local_path()}",
                            spec.unconfirmed or spec.source or "see its entry for where it is published")
        return _done(spec, locate(spec, precision).files[0], "local")
    if kind == "url":
        path = url_path(spec)
        if path.is_file():
            return _done(spec, path, "already here")
        report(f"{spec.name}: downloading {spec.weights.url}")
        download(spec.weights.url, path, spec.weights.sha256, progress, spec.name)
        return _done(spec, path, "downloaded")
    return _fetch_hub(spec, progress, report)


def _done(spec: ModelSpec, path: Path, action: str) -> Fetched:
    digest = sha256_of(path)
    declared = spec.weights.sha256
    return Fetched(spec.name, path, path.stat().st_size, None if declared is None else digest == declared, digest,
                   action)


# -- direct downloads ---------------------------------------------------------------------------
def download(url: str, dest: Path, sha256: str | None, progress: bool, what: str) -> None:
    """``url`` into ``dest``, through a partial file that a rerun resumes; verified against
    ``sha256`` (when given) before it is moved into place."""
    partial = cache_dir() / "models" / ".partial" / (dest.parent.name + "-" + dest.name + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vlbench", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already whole
            response = None
        else:
            raise UserError(f"{what}: {url} answered {exc.code} {exc.reason}",
                            "the entry's url is wrong or the file moved; correct the entry") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"{what}: cannot reach {url} ({getattr(exc, 'reason', exc)})",
                        "check the network (or fetch on a connected machine and copy the cache)") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0  # the server sent the whole file: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            _stream(response, partial, "ab" if resumed else "wb", have, total, progress, what, url)
    digest = _sha256(partial)
    if sha256 is not None and digest != sha256:
        partial.unlink(missing_ok=True)
        raise UserError(f"{what}: the file from {url} has sha256 {digest[:16]}…, not the {sha256[:16]}… its "
                        "entry declares; it was deleted", "the download was corrupted or the file changed: fetch again, "
                        "and if it repeats, report it")
    if _is_web_page(partial):
        partial.unlink(missing_ok=True)
        raise UserError(f"{what}: {url} returned a web page, not weights; it was deleted",
                        "the host wants a login or a confirmation: download by hand and give the entry a path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)


def _stream(response, partial: Path, mode: str, have: int, total: int | None, progress: bool, what: str, url: str):
    bar = progress_bar(total=total, initial=have, desc=f"fetch {what}", enabled=progress, unit="B")
    written = have
    try:
        with open(partial, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as exc:  # http.client.IncompleteRead is an OSError
                    raise _cut(what, written, total, exc) from None
                if not block:
                    break
                out.write(block)
                written += len(block)
                bar.update(len(block))
    finally:
        bar.close()
    if total is not None and written < total:
        raise _cut(what, written, total, "the connection closed early")


def _cut(what: str, written: int, total: int | None, reason) -> UserError:
    of = f" of {total / 2**20:.1f}" if total else ""
    return UserError(f"{what}: the transfer was cut at {written / 2**20:.1f}{of} MB ({reason})",
                     "run the same command again: it resumes where it stopped")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_web_page(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


# -- the Hugging Face hub -----------------------------------------------------------------------
@contextlib.contextmanager
def _online() -> Iterator[None]:
    """huggingface_hub allowed to download, for this block only (``vlbench`` imports it offline)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _fetch_hub(spec: ModelSpec, progress: bool, report: Callable[[str], None]) -> Fetched:
    options = hub_files(spec)
    for files in options:
        found = hub_location(files)
        if found is not None:
            return _verified_hub(spec, files, found[0], "already here")
    problems = []
    for files in options:
        try:
            path = _download_hub(spec, files, progress, report)
        except _NotOnHub as exc:
            problems.append(str(exc))
            continue
        return _verified_hub(spec, files, path, "downloaded")
    raise UserError(f"{spec.name}: {'; '.join(problems)}",
                    "check the entry's hf_hub, file and revision against the repository")


class _NotOnHub(Exception):
    """A file of one alternative layout is not in the repository."""


def _download_hub(spec: ModelSpec, files: HubFiles, progress: bool, report: Callable[[str], None]) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None

    def bar(**kwargs):  # huggingface_hub's progress, as vlbench shows progress (lines off a terminal)
        return progress_bar(total=kwargs.get("total"), initial=kwargs.get("initial", 0),
                            desc=f"fetch {spec.name}", enabled=progress, unit="B")

    weights = None
    with _online():
        for index, group in enumerate(files.groups):
            path = None
            for name in group:
                try:
                    report(f"{spec.name}: hf-hub:{files.repo}/{name}")
                    path = Path(hf_hub_download(files.repo, name, revision=files.revision, cache_dir=str(hub_cache()),
                                                endpoint=endpoint, tqdm_class=bar))
                    break
                except EntryNotFoundError:
                    continue
                except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
                    raise UserError(f"{spec.name}: hf-hub:{files.repo}"
                                    + (f"@{files.revision}" if files.revision else "")
                                    + f" is not available ({type(exc).__name__})",
                                    "check the entry's hf_hub and revision (a gated repository needs `hf auth "
                                    "login` first)") from None
                except Exception as exc:  # noqa: BLE001 - HTTP errors, cut connections (httpx's own types), disk
                    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                    raise UserError(f"{spec.name}: the transfer from hf-hub:{files.repo} failed ({reason})",
                                    "run the same command again: it resumes where it stopped") from None
            if path is None:
                raise _NotOnHub(f"hf-hub:{files.repo} has no {' or '.join(group)}")
            if path.name.endswith(".index.json"):
                import json

                for shard in sorted(set(json.loads(path.read_text()).get("weight_map", {}).values())):
                    hf_hub_download(files.repo, shard, revision=files.revision, cache_dir=str(hub_cache()),
                                    endpoint=endpoint, tqdm_class=bar)
            if index == files.weights_group:
                weights = path
    return weights


def _verified_hub(spec: ModelSpec, files: HubFiles, path: Path, action: str) -> Fetched:
    digest = sha256_of(path)
    declared = spec.weights.sha256
    if declared is not None and digest != declared:
        _evict(path)
        raise UserError(f"{spec.name}: {files.repo}/{path.name} has sha256 {digest[:16]}…, not the "
                        f"{declared[:16]}… its entry declares; it was removed from the cache",
                        "the download was corrupted or the repository changed: fetch again, and if it repeats, "
                        "check the entry's revision")
    return Fetched(spec.name, path, path.stat().st_size, None if declared is None else True, digest, action)


def _evict(path: Path) -> None:
    """Remove a cached hub file: the snapshot's link and the blob it points at."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path and hub_cache() in blob.parents:
        blob.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # an emptied snapshot folder goes too; one with other files stays
        path.parent.rmdir()
