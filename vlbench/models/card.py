"""The model card: every model vlbench can evaluate or fine-tune, one entry each in ``models.yaml``.

An entry names an open_clip architecture (``arch``), where its weights come from
(``weights``: exactly one of an open_clip pretrained ``tag``, a Hugging Face ``hf_hub``
repository with an optional ``file`` and ``revision``, a ``url`` with its ``sha256``, a local
``path``, a ``package`` file shipped with vlbench with its ``sha256`` (the synthetic world's
CLIP), or a ``build`` that makes them on first use), the
release ``format`` the files are in (:mod:`vlbench.models.formats`), which ``towers`` they
replace (``full``; ``visual`` or ``text`` on top of a ``base`` entry that supplies the other
tower, as RobustVLM's and TeCoA's image-only releases are published), preprocessing where it
is not open_clip's (``image_size``, ``mean``, ``std``, ``quick_gelu``), and where each fact was
read: ``paper``, ``licence``, ``source`` (the file the identifier or URL was read from),
``unconfirmed`` (what could not be confirmed from a file read) and ``claimed`` (the numbers
the authors report, :class:`vlbench.schema.Claim`).

A matrix config may add entries of its own under ``models:`` (a user's checkpoint beside the
released ones); ``--model ARCH --pretrained TAG|hf-hub:ORG/NAME|PATH`` makes an entry of its own
(:func:`vlbench.models.factory.named_model`). Every row of a leaderboard has one entry as its base model, and
:func:`identity` keys its cells and caches by the entry's weights: the files' sha256, or what
a build is made from.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vlbench.errors import UserError
from vlbench.registry import import_target, unknown_name
from vlbench.schema import from_mapping, parse_claims, read_card, read_once
from vlbench.store.paths import cache_dir, card_file

FORMATS = ("auto", "open_clip", "open_clip_hf", "visual_state_dict", "tecoa", "transformers")
TOWERS = ("full", "visual", "text")
SOURCES = ("tag", "hf_hub", "url", "path", "package", "build")
HF_PREFIX = "hf-hub:"


class WeightsBuilder(Protocol):
    """What a ``weights: {build: module:attribute}`` entry names: something that makes the
    weights file on first use (the world CLIP's pretraining) and names it before it exists."""

    #: what the build is, for the plan a run prints ("world CLIP pretraining")
    what: str

    def key(self, precision: str) -> str:
        """What the weights are made from (config, code version), as a short hash."""

    def path(self, precision: str) -> Path:
        """Where the built weights (an open_clip state dict in safetensors) live."""

    def work(self, precision: str) -> Any:
        """The build's operations (a :class:`vlbench.monitor.cost.Work`), for a run's estimate."""

    def build(self, precision: str, progress: bool) -> Path:
        """Make the weights (or wait for another process making them); return their path."""


@dataclass(frozen=True)
class Weights:
    """Where an entry's weights come from: exactly one of :data:`SOURCES`."""

    tag: str | None = None
    hf_hub: str | None = None
    url: str | None = None
    path: str | None = None
    #: a file shipped inside the vlbench package, relative to its folder (needs its sha256)
    package: str | None = None
    build: str | None = None
    #: hf_hub: the one file to read (formats held in one file); url: the name to keep it under
    file: str | None = None
    #: hf_hub: a branch, tag or commit (default: main)
    revision: str | None = None
    #: the sha256 of the weights file, where its publisher gives one (or it was measured)
    sha256: str | None = None

    @property
    def kind(self) -> str:
        return next(k for k in SOURCES if getattr(self, k) is not None)

    def describe(self) -> str:
        """Where the weights come from, as a person reads it."""
        if self.tag is not None:
            return f"{self.tag} (open_clip tag)"
        if self.hf_hub is not None:
            return (f"{HF_PREFIX}{self.hf_hub}" + (f"/{self.file}" if self.file else "")
                    + (f"@{self.revision}" if self.revision else ""))
        if self.url is not None:
            return self.url
        if self.path is not None:
            return self.path
        if self.package is not None:
            return f"vlbench/{self.package} (shipped with vlbench)"
        return f"built by {self.build}"


@dataclass(frozen=True)
class ModelSpec:
    """One model card entry (see the module docstring)."""

    name: str
    arch: str
    weights: Weights
    format: str = "auto"
    towers: str = "full"
    base: str | None = None
    #: the OpenAI activation (x·σ(1.702x)): None takes it from the tag, the release's config or
    #: the base; OpenAI's weights and everything fine-tuned from them need it
    quick_gelu: bool | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    paper: str = ""
    licence: str = ""
    source: str = ""
    unconfirmed: str = ""
    description: str = ""
    claimed: list = field(default_factory=list)
    #: the folder a relative ``path`` is read from: the cache's ``models/`` for the card's
    #: entries, the working directory for a config's and ``--pretrained``
    root: str = ""

    def local_path(self) -> Path:
        path = Path(os.path.expandvars(self.weights.path or "")).expanduser()
        return path if path.is_absolute() else Path(self.root or ".") / path

    def builder(self) -> WeightsBuilder:
        return import_target(self.weights.build)


def parse_entry(name: str, raw: Any, where: str, root: Path) -> ModelSpec:
    """One entry, checked: its keys and their types, one weights source, a known format and
    towers, a base for a partial release, valid claimed numbers."""
    what = f"model {name!r} in {where}"
    if not isinstance(raw, dict):
        raise UserError(f"{what} is not a mapping", "give it arch:, weights: and format: keys")
    weights = raw.get("weights")
    if isinstance(weights, str):  # the short forms: a tag, hf-hub:ORG/NAME, a URL, a path
        weights = weights_from_text(weights, what)
    weights = from_mapping(Weights, weights, f"{what}: weights")
    given = [k for k in SOURCES if getattr(weights, k) is not None]
    if len(given) != 1:
        raise UserError(f"{what}: weights names {len(given)} sources ({', '.join(given) or 'none'})",
                        f"give exactly one of {', '.join(SOURCES)}")
    if weights.url is not None and not weights.url.startswith(("http://", "https://")):
        raise UserError(f"{what}: weights url {weights.url!r} is not http(s)", "give the full download address")
    if weights.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", weights.sha256):
        raise UserError(f"{what}: weights sha256 {weights.sha256!r} is not 64 hex digits", "copy it whole, lower case")
    if weights.package is not None and weights.sha256 is None:
        raise UserError(f"{what}: a package file needs its sha256", "add the sha256 that `vlbench world pretrain --release` printed")
    if weights.hf_hub is not None and weights.hf_hub.count("/") != 1:
        raise UserError(f"{what}: hf_hub {weights.hf_hub!r} is not ORG/NAME", "name the file with file:, not in the id")
    spec = from_mapping(ModelSpec, raw, what, required=("arch", "weights", "format"), skip=("weights",),
                        name=name, weights=weights, root=str(root))
    spec = dataclasses.replace(spec, mean=_triple(spec.mean, what, "mean"), std=_triple(spec.std, what, "std"))
    if spec.format not in FORMATS:
        raise UserError(f"{what}: format {spec.format!r} is unknown", f"use one of {', '.join(FORMATS)}")
    if spec.towers not in TOWERS:
        raise UserError(f"{what}: towers {spec.towers!r} is unknown", f"use one of {', '.join(TOWERS)}")
    if (spec.towers == "full") != (spec.base is None):
        raise UserError(f"{what}: towers {spec.towers} " + ("needs a base entry for its other tower"
                                                            if spec.base is None else "takes no base"),
                        "a visual or text release names the entry that supplies the other tower in base:")
    if spec.format in ("visual_state_dict", "tecoa") and spec.towers != "visual":
        raise UserError(f"{what}: format {spec.format} holds the image tower only", "set towers: visual and a base:")
    if spec.weights.kind in ("build", "package") and spec.format not in ("open_clip", "auto"):
        raise UserError(f"{what}: a {spec.weights.kind} weights file is an open_clip state dict", "set format: open_clip")
    parse_claims(spec.claimed, what)
    return spec


def _triple(value, what: str, key: str):
    if value is None:
        return None
    if len(value) != 3:
        raise UserError(f"{what}: {key} has {len(value)} values", "give one per colour channel (R, G, B)")
    return tuple(float(v) for v in value)


def weights_from_text(text: str, what: str) -> dict:
    """A tag, ``hf-hub:ORG/NAME``, or a path, as a weights mapping (a URL needs its sha256)."""
    if text.startswith(HF_PREFIX):
        return parse_hf(text, what)
    if text.startswith(("http://", "https://")):
        raise UserError(f"{what}: a URL needs its sha256", "write weights: {url: ..., sha256: ...}")
    if "/" in text or Path(text).suffix or text.startswith("~"):
        return {"path": text}
    return {"tag": text}


def parse_hf(text: str, what: str) -> dict:
    """``hf-hub:ORG/NAME``, optionally ``/FILE`` and ``@REVISION``, as a weights mapping."""
    body, _, revision = text[len(HF_PREFIX):].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise UserError(f"{what}: {text!r} is not hf-hub:ORG/NAME", "write e.g. hf-hub:chs20/fare2-clip")
    found = {"hf_hub": "/".join(parts[:2])}
    if len(parts) > 2:
        found["file"] = "/".join(parts[2:])
    if revision:
        found["revision"] = revision
    return found


# -- the card -------------------------------------------------------------------------------
def card_path() -> Path:
    return card_file("models.yaml", "VLBENCH_MODELS_FILE")


def load_card(path: Path) -> dict[str, ModelSpec]:
    # a relative path in a card is under the cache's models/ folder (where `fetch` puts files and
    # where a release published without a direct link is placed by hand)
    return entries_of(read_card(path, "models", "model card"), str(path), cache_dir() / "models")


def entries_of(raw: dict, where: str, root: Path) -> dict[str, ModelSpec]:
    """The entries of a ``models:`` mapping (the card's, or a matrix config's own), each checked
    (:func:`parse_entry`); relative paths are read from ``root``."""
    if not isinstance(raw, dict):
        raise UserError(f"models in {where} is not a mapping", "write models: {NAME: {arch: ..., weights: ...}}")
    specs = {str(name): parse_entry(str(name), entry, where, root) for name, entry in raw.items()}
    return specs


def card() -> dict[str, ModelSpec]:
    return read_once(card_path(), load_card)


def get_model(name: str, extra: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The entry ``name``: a config's own entries first, then the card's."""
    known = {**card(), **(extra or {})}
    if name not in known:
        raise UserError(unknown_name("model", name, known),
                        f"models are the entries of {card_path()} (vlbench ls models) and a config's models:")
    spec = known[name]
    if spec.base is not None:
        base = get_model(spec.base, extra)
        if base.towers != "full":
            raise UserError(f"model {name!r} has base {spec.base!r}, itself a {base.towers}-tower release",
                            "name an entry with towers: full as the base")
    return spec


def config_entries(raw: Any, where: str) -> dict[str, ModelSpec]:
    """A matrix config's own ``models:``; a name the card already has is refused (one name,
    one set of weights)."""
    specs = entries_of(raw, where, Path.cwd())
    taken = sorted(set(specs) & set(card()))
    if taken:
        raise UserError(f"{where} declares model {taken[0]!r}, which {card_path()} already has",
                        "give your entry another name")
    return specs


def adhoc_name(pretrained: str) -> str:
    """The name of the entry ``--pretrained`` makes: the file, or the hub repository."""
    text = pretrained[len(HF_PREFIX):] if pretrained.startswith(HF_PREFIX) else Path(pretrained).name or pretrained
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "weights"


def identity(spec: ModelSpec, fingerprint: str, base: dict | None = None) -> dict[str, Any]:
    """What names ``spec``'s weights in every cell key and record: the entry, architecture,
    format and towers, where the weights came from, their ``fingerprint`` (the files'
    sha256, or a build's key) and the base entry's identity for a partial release."""
    return {"entry": spec.name, "arch": spec.arch, "tag": spec.weights.tag, "source": spec.weights.describe(),
            "format": spec.format, "towers": spec.towers, "weights": fingerprint,
            "preprocess": {"image_size": spec.image_size, "mean": spec.mean, "std": spec.std,
                           "quick_gelu": spec.quick_gelu},
            "base": base}


