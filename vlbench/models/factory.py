"""One way to create any model: a model card entry (:mod:`vlbench.models.card`) as a
:class:`~vlbench.models.victim.Victim`.

:func:`create_victim` finds the entry's files (:func:`vlbench.models.weights.locate`; a
build, such as the world CLIP's pretraining, runs here on first use), reads them in their
release format (:mod:`vlbench.models.formats`), builds the open_clip architecture (the entry's
``arch``, or the config the release carries; with OpenAI's activation where the tag, the
release or the entry says so) and loads the tensors strictly: every tensor of the tower the
release replaces must be there, with its shape, or the error says which differs. A visual or
text release is loaded onto its base entry's model. As open_clip's ``factory.create_model``
does, but with nothing downloaded and every release format read.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlbench.errors import UserError
from vlbench.models.card import ModelSpec, Weights, adhoc_name, card, get_model, weights_from_text
from vlbench.models.formats import Release, detect, peek, read_release, unwrap
from vlbench.models.victim import Victim, register_model_configs
from vlbench.models.weights import fingerprint, locate

#: logit_scale (and a SigLIP logit_bias) belong to the full model, not to either tower
_SHARED = ("logit_scale", "logit_bias")


def create_victim(spec: ModelSpec, device: str | torch.device = "cpu", precision: str = "fp32",
                  extra: dict[str, ModelSpec] | None = None, progress: bool = True) -> Victim:
    """The model of ``spec``, in eval mode, as a :class:`Victim` on ``device``."""
    model, tokenizer, preprocess = _build(spec, precision, extra, progress)
    model.eval()
    victim = Victim(model, tokenizer, spec.name, spec.weights.describe(), precision,
                    mean=preprocess.get("mean"), std=preprocess.get("std"))
    return victim.to(device)


def load_victim(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                precision: str = "fp32", extra: dict[str, ModelSpec] | None = None) -> Victim:
    """The model ``--model`` and ``--pretrained`` name (:func:`named_model`)."""
    return create_victim(named_model(model, pretrained, extra), device, precision, extra)


def named_model(model: str, pretrained: str | None = None, extra: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The entry ``--model`` and ``--pretrained`` ask for: a model card entry by name; other
    weights on top of an entry (an image-tower release goes onto the entry's model, full
    weights keep its architecture and activation); or an open_clip architecture with a tag,
    ``hf-hub:ORG/NAME[/FILE][@REVISION]`` or a path. The release format is read from the
    files."""
    entries = {**card(), **(extra or {})}
    on = get_model(model, extra) if model in entries else None
    if pretrained in (None, ""):
        if on is not None:
            return on
        raise UserError(f"--model {model!r} is neither a model entry nor given weights",
                        "name a models.yaml entry (vlbench ls models), or add --pretrained TAG|hf-hub:ORG/NAME|PATH")
    what = f"--pretrained {pretrained!r}"
    if on is None:
        check_arch(model, "--model")
    weights = Weights(**weights_from_text(pretrained, what))
    spec = ModelSpec(name=adhoc_name(pretrained), arch=on.arch if on else model, weights=weights,
                     quick_gelu=on.quick_gelu if on else None, root=str(Path.cwd()), source="--pretrained")
    if weights.kind == "tag":
        return dataclasses.replace(spec, format="open_clip")
    location = locate(spec).location
    fmt = detect(location)
    image_only = fmt in ("visual_state_dict", "tecoa") or (
        fmt == "open_clip" and all(k.startswith("visual.") for k in unwrap(peek(location), location)))
    spec = dataclasses.replace(spec, format=fmt)
    if not image_only:
        return spec
    if on is None:
        raise UserError(f"{what} holds the image tower alone ({fmt}): it needs a model for its text tower",
                        f"name that model's entry in --model, e.g. --model openai-vit-b-32 --pretrained {pretrained}")
    return dataclasses.replace(spec, towers="visual", base=on.name)


def _build(spec: ModelSpec, precision: str, extra, progress: bool) -> tuple[nn.Module, Any, dict]:
    located = locate(spec, precision)
    if spec.weights.sha256 is not None:
        fingerprint(spec, precision)  # a file that differs from its entry is refused, not loaded
    if located.pending_build:
        location = spec.builder().build(precision, progress)
    else:
        location = located.location
    fmt = "open_clip" if spec.weights.kind in ("tag", "build", "package") else spec.format
    if fmt == "auto":
        fmt = detect(location)
    release = read_release(fmt, location)
    where = f"model {spec.name!r} ({location})"
    towers = spec.towers
    if towers == "full":
        model_cfg = _model_cfg(spec, release)
        model = _instantiate(model_cfg, spec.arch)
        _load(model, release.state, model.state_dict().keys(), where, spec.arch)
        return model, _tokenizer(spec.arch, model_cfg), _preprocess(spec, model_cfg, release)
    base = get_model(spec.base, extra)
    model, tokenizer, preprocess = _build(base, precision, extra, progress)
    if towers == "visual":
        keys = [k for k in model.state_dict() if k.startswith("visual.")]
    else:
        keys = [k for k in model.state_dict() if not k.startswith("visual.") and k not in _SHARED]
    visual = towers == "visual"
    state = {k: v for k, v in release.state.items() if k.startswith("visual.") == visual and k not in _SHARED}
    _load(model, state, keys, where, f"{spec.arch}'s {towers} tower")
    preprocess = {**preprocess, **{k: v for k, v in (("mean", spec.mean), ("std", spec.std)) if v is not None}}
    return model, tokenizer, preprocess


def _model_cfg(spec: ModelSpec, release: Release) -> dict:
    import open_clip

    register_model_configs()
    if release.model_cfg is not None:
        cfg = copy.deepcopy(release.model_cfg)
    else:
        check_arch(spec.arch, f"model {spec.name!r}")
        cfg = copy.deepcopy(open_clip.get_model_config(spec.arch))
    quick_gelu = spec.quick_gelu
    if quick_gelu is None:
        quick_gelu = release.quick_gelu
    if quick_gelu is None and spec.weights.tag is not None:
        quick_gelu = bool(open_clip.get_pretrained_cfg(spec.arch, spec.weights.tag).get("quick_gelu", False))
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    if spec.image_size is not None:
        cfg.setdefault("vision_cfg", {})["image_size"] = spec.image_size
    # the weights come from the release, never from a download inside the architecture
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg


def check_arch(arch: str, what: str) -> None:
    """A one-line error, with the closest names, unless open_clip knows ``arch``."""
    import open_clip

    register_model_configs()
    if arch in open_clip.list_models():
        return
    from vlbench.registry import unknown_name

    raise UserError(f"{what}: {unknown_name('model architecture', arch, open_clip.list_models())}",
                    "give an open_clip architecture (or a model entry: vlbench ls models)")


def _instantiate(cfg: dict, arch: str) -> nn.Module:
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    cfg.pop("preprocess_cfg", None)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP if custom else CLIP
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise UserError(f"the architecture config of {arch} is not open_clip's ({exc})",
                        "check the release's open_clip_config.json") from None


def _load(model: nn.Module, state: dict[str, torch.Tensor], keys, where: str, what: str) -> None:
    """Load ``state`` into the tensors ``keys`` of ``model``: every one present with its shape,
    nothing else, or one line naming what differs."""
    expected = model.state_dict()
    keys = list(keys)
    state = dict(state)
    if "logit_scale" in state and "logit_scale" in expected:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    wrong = [(k, tuple(expected[k].shape), tuple(state[k].shape)) for k in keys
             if k in state and expected[k].shape != state[k].shape]
    if wrong:
        key, want, got = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise UserError(f"{where} does not fit {what}: {key} is {list(want)} in {what} but {list(got)} in the "
                        f"checkpoint{more}", "it is a checkpoint of another architecture: check arch: in its entry")
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in keys]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} tensors of {what} (first: {missing[0]})")
        if unexpected:
            parts.append(f"has {len(unexpected)} it does not use (first: {unexpected[0]})")
        raise UserError(f"{where} {' and '.join(parts)}",
                        "check the entry's arch, format and towers (a visual release needs towers: visual)")
    merged = {**expected, **{k: v.to(expected[k].dtype) for k, v in state.items()}}
    model.load_state_dict(merged, strict=True)


def _tokenizer(arch: str, cfg: dict):
    import open_clip

    context = cfg.get("text_cfg", {}).get("context_length", 77)
    if arch in open_clip.list_models():
        return open_clip.get_tokenizer(arch, context_length=context)
    name = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if name:
        return open_clip.tokenizer.HFTokenizer(name, context_length=context)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def _preprocess(spec: ModelSpec, cfg: dict, release: Release) -> dict:
    """Mean and std: open_clip's defaults, the architecture's, the tag's, the release's, the entry's."""
    import open_clip

    found: dict[str, Any] = {}
    for layer in (cfg.get("preprocess_cfg") or {}, open_clip.get_pretrained_cfg(spec.arch, spec.weights.tag or "")
                  if spec.weights.tag else {}, release.preprocess, {"mean": spec.mean, "std": spec.std}):
        found.update({k: tuple(v) for k, v in layer.items() if k in ("mean", "std") and v is not None})
    return found


def architecture_victim(spec: ModelSpec, precision: str = "fp32", extra: dict[str, ModelSpec] | None = None) -> Victim:
    """``spec``'s architecture with random weights (seed the RNG first): what a run times its
    operations on before the weights exist (a build yet to run) or to spare loading them."""
    while spec.towers != "full" and spec.base is not None:
        spec = get_model(spec.base, extra)
    cfg = _model_cfg(spec, Release({}))
    return Victim(_instantiate(cfg, spec.arch).eval(), _tokenizer(spec.arch, cfg), spec.name, None, precision)
