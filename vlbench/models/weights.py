"""Where a model entry's weights are on this machine, their fingerprint, and whether they are
verified.

Nothing here downloads (:mod:`vlbench.models.fetch` does, when asked). Each source has one
place: an open_clip tag and an ``hf_hub`` repository in the standard Hugging Face cache
(``$HF_HOME/hub``, where open_clip, transformers and ``hf download`` look too), a URL in
``<vlbench cache>/models/url/``, a path where it says, a build where its builder puts it. A
missing file is one line naming ``vlbench models fetch NAME`` and the exact path looked in.

The fingerprint of an entry's weights is the sha256 of the files read (remembered per file
path, size and modification time in ``<cache>/models/sha256.json``, so a multi-gigabyte
checkpoint is hashed once), or a build's key: cells and caches are named by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlbench.errors import UserError
from vlbench.models.card import ModelSpec
from vlbench.models.formats import (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, TRANSFORMERS_CONFIG, TRANSFORMERS_WEIGHTS,
                                    first_file)
from vlbench.store.files import atomic_write_json, file_lock, stable_hash
from vlbench.store.paths import cache_dir, package_file


class ModelMissing(UserError):
    """An entry's weights are not on this machine."""


@dataclass(frozen=True)
class HubFiles:
    """The files of a Hugging Face repository an entry reads: every group is needed, and of
    each group the first name the repository has."""

    repo: str
    revision: str | None
    groups: tuple[tuple[str, ...], ...]
    #: the group whose file is the weights (the one a declared sha256 is of)
    weights_group: int


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_files(spec: ModelSpec) -> list[HubFiles]:
    """What an ``hf_hub`` or ``tag`` entry reads from the hub; alternatives (``format: auto``
    without a file) in order of preference."""
    weights = spec.weights
    if weights.tag is not None:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, weights.tag)
        if not cfg:
            tags = [t for arch, t in open_clip.list_pretrained() if arch == spec.arch]
            raise UserError(f"model {spec.name!r}: {spec.arch} has no pretrained tag {weights.tag!r}",
                            f"use one of {tags or 'no tags: give hf_hub, url or path'}")
        if not cfg.get("hf_hub"):
            raise UserError(f"model {spec.name!r}: open_clip's tag {spec.arch}/{weights.tag} has no Hugging Face copy",
                            "vlbench reads tags from the Hugging Face hub only (open_clip's other files are "
                            "TorchScript archives, which run code when loaded); give the entry a url or path")
        parts = cfg["hf_hub"].strip("/").split("/")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
        return [HubFiles(repo, None, ((file,) if file else OPEN_CLIP_WEIGHTS,), 0)]
    repo, revision = weights.hf_hub, weights.revision
    open_clip_hf = HubFiles(repo, revision, ((OPEN_CLIP_CONFIG,), (weights.file,) if weights.file else OPEN_CLIP_WEIGHTS), 1)
    transformers = HubFiles(repo, revision, ((TRANSFORMERS_CONFIG,), (weights.file,) if weights.file
                                             else TRANSFORMERS_WEIGHTS), 1)
    if spec.format == "open_clip_hf":
        return [open_clip_hf]
    if spec.format == "transformers":
        return [transformers]
    if weights.file and spec.format != "auto":
        return [HubFiles(repo, revision, ((weights.file,),), 0)]
    if weights.file:  # auto with one file: its own format, read from the file itself
        return [HubFiles(repo, revision, ((weights.file,),), 0), open_clip_hf, transformers]
    return [open_clip_hf, transformers]


def _cached(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache()), revision=revision)
    return Path(found) if isinstance(found, str) else None


def hub_location(files: HubFiles) -> tuple[Path, list[Path]] | None:
    """The cached files of ``files`` (the weights file first), or None if one is missing. A
    sharded transformers checkpoint brings its shards."""
    found: list[Path] = []
    for index, group in enumerate(files.groups):
        path = next((p for p in (_cached(files.repo, name, files.revision) for name in group) if p), None)
        if path is None:
            return None
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            paths = [_cached(files.repo, shard, files.revision) for shard in shards]
            if any(p is None for p in paths):
                return None
            found += [p for p in paths if p is not None]
        found.insert(0, path) if index == files.weights_group else found.append(path)
    return found[0], found


def hub_path_hint(files: HubFiles) -> Path:
    """Where the Hugging Face cache keeps the weights of ``files``, for messages."""
    name = files.groups[files.weights_group][0]
    folder = hub_cache() / ("models--" + files.repo.replace("/", "--")) / "snapshots" / (files.revision or "<commit>")
    return folder / name


def url_path(spec: ModelSpec) -> Path:
    """Where a ``url`` entry's file lives: named by its sha256 (else the URL) and file name."""
    weights = spec.weights
    name = weights.file or Path(weights.url.split("?")[0].rstrip("/")).name or "weights"
    folder = weights.sha256[:16] if weights.sha256 else stable_hash({"url": weights.url}, 16)
    return cache_dir() / "models" / "url" / folder / name


@dataclass
class Located:
    """An entry's weights on disk: ``location`` to read (a file, or a release folder) and
    every file it reads (the weights file first), or a build that has yet to run."""

    location: Path | None
    files: list[Path]
    pending_build: bool = False


def locate(spec: ModelSpec, precision: str = "fp32") -> Located:
    """Where ``spec``'s weights are; :class:`ModelMissing` (one line: the fetch command and the
    path looked in) when they are not on this machine. A build not yet run is no error."""
    kind = spec.weights.kind
    if kind == "build":
        path = spec.builder().path(precision)
        return Located(path, [path]) if path.is_file() else Located(None, [], pending_build=True)
    if kind == "path":
        path = spec.local_path()
        if not path.exists():
            raise UserError(f"model {spec.name!r}: {path} does not exist", "check the path in its entry (or --pretrained)")
        if path.is_dir():
            return Located(path, _folder_files(path, spec))
        return Located(path, [path])
    if kind == "package":
        path = package_file(spec.weights.package)
        if not path.is_file():
            raise UserError(f"model {spec.name!r}: {path} is missing from the installed vlbench",
                            "reinstall vlbench (pip install -e .), or rebuild it with `vlbench world pretrain --release`")
        return Located(path, [path])
    if kind == "url":
        path = url_path(spec)
        if not path.is_file():
            raise ModelMissing(f"model {spec.name!r} is not on this machine (looked for {path})",
                               f"run `vlbench models fetch {spec.name}` where the network reaches {spec.weights.url}")

        return Located(path, [path])
    options = hub_files(spec)
    for files in options:
        found = hub_location(files)
        if found is not None:
            weights, every = found
            folder_format = len(files.groups) > 1
            return Located(weights.parent if folder_format else weights, every)
    files = options[0]
    if spec.source == "--pretrained":  # not an entry that `vlbench models fetch` knows
        command = f"hf download {files.repo} " + " ".join(group[0] for group in files.groups) + (
            f" --revision {files.revision}" if files.revision else "")
    else:
        command = f"vlbench models fetch {spec.name}"
    raise ModelMissing(f"model {spec.name!r} is not on this machine (looked for {hub_path_hint(files)})",
                       f"run `{command}` where the network reaches the Hugging Face hub (or copy that cache folder here)")


def _folder_files(folder: Path, spec: ModelSpec) -> list[Path]:
    """The files of a release folder, the weights file first."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return [first_file(folder, OPEN_CLIP_WEIGHTS, "open_clip weights"), folder / OPEN_CLIP_CONFIG]
    if (folder / TRANSFORMERS_CONFIG).is_file():
        weights = first_file(folder, TRANSFORMERS_WEIGHTS, "transformers weights")
        shards = ([folder / s for s in sorted(set(json.loads(weights.read_text()).get("weight_map", {}).values()))]
                  if weights.name.endswith(".index.json") else [])
        return [weights, *shards, folder / TRANSFORMERS_CONFIG]
    raise UserError(f"model {spec.name!r}: folder {folder} holds neither {OPEN_CLIP_CONFIG} nor {TRANSFORMERS_CONFIG}",
                    "point the entry at the checkpoint file itself, or at a release folder")


# -- fingerprints -------------------------------------------------------------------------------
def _index_path() -> Path:
    return cache_dir() / "models" / "sha256.json"


def sha256_of(path: Path) -> str:
    """The sha256 of ``path``'s bytes, remembered by path, size and modification time."""
    real = Path(path).resolve()
    stat = real.stat()
    key = str(real)
    stamp = [stat.st_size, stat.st_mtime_ns]
    index_path = _index_path()
    try:
        known = json.loads(index_path.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key, {}).get("stamp") == stamp:
        return known[key]["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    with file_lock(index_path.with_suffix(".lock"), "the sha256 index"):
        try:
            known = json.loads(index_path.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = {"stamp": stamp, "sha256": value}
        atomic_write_json(index_path, known)
    return value


def fingerprint(spec: ModelSpec, precision: str = "fp32") -> str:
    """What names ``spec``'s weights: a build's key, or the sha256 of the files it reads (the
    weights file's checked against the entry's declared sha256)."""
    if spec.weights.kind == "build":
        return spec.builder().key(precision)
    located = locate(spec, precision)
    digests = [sha256_of(path) for path in located.files]
    declared = spec.weights.sha256
    if declared and digests[0] != declared:
        fix = ("reinstall vlbench, or release the file again with `vlbench world pretrain --release`"
               if spec.weights.kind == "package" else f"remove it and run `vlbench models fetch {spec.name}`")
        raise UserError(f"model {spec.name!r}: {located.files[0]} has sha256 {digests[0][:16]}…, not the "
                        f"{declared[:16]}… its entry declares", fix)
    return digests[0] if len(digests) == 1 else stable_hash(digests, 64)


@dataclass
class Status:
    """What ``vlbench models check`` says of one entry."""

    name: str
    present: bool
    where: str
    size: int | None = None
    verified: bool | None = None   # None: nothing to verify against
    note: str = ""


def status(spec: ModelSpec, precision: str = "fp32") -> Status:
    try:
        located = locate(spec, precision)
    except ModelMissing as exc:
        return Status(spec.name, False, str(exc).split("looked for ", 1)[-1].split(")")[0])
    except UserError as exc:
        return Status(spec.name, False, str(exc))
    if located.pending_build:
        path = spec.builder().path(precision)
        return Status(spec.name, False, str(path), note="built on first use (vlbench models fetch builds it now)")
    size = sum(path.stat().st_size for path in located.files)
    declared = spec.weights.sha256
    if declared is None:
        return Status(spec.name, True, str(located.location), size, None,
                      "unverified: no published sha256" if spec.weights.kind != "build" else "built here")
    ok = sha256_of(located.files[0]) == declared
    return Status(spec.name, True, str(located.location), size, ok,
                  "sha256 matches the entry" if ok else "sha256 DIFFERS from the entry: remove it and fetch again")


def human_size(size: int | None) -> str:
    if size is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
