"""The release formats: each reads one way robust CLIPs are published into open_clip's names.

A reader takes where the files are (a file, or a folder such as a Hugging Face snapshot) and
returns a :class:`Release`: tensors under open_clip ``CLIP`` state-dict names (the image
tower's under ``visual.``), and the architecture config and preprocessing the release carries,
if any. Pickled files are read with ``torch.load(weights_only=True)`` only: tensors and plain
containers, never code.

========================= =====================================================================
``open_clip``             an open_clip state dict, safetensors or a torch file; a ``state_dict``
                          wrapper and DataParallel's ``module.`` prefixes are undone
``open_clip_hf``          open_clip's Hugging Face layout (``push_to_hf_hub``): a folder with
                          ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and
                          ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``
                          (RobustVLM's ``chs20/*-clip``, ΔCLIP)
``visual_state_dict``     the image tower's state dict alone, ``conv1.weight`` ... ``proj``:
                          RobustVLM's and Sim-CLIP's ``*.pt`` files, saved from ``model.visual``
``tecoa``                 the TeCoA code's checkpoint (``TeCoAmodel_best.pth.tar``; PMG-AFT and
                          TGA-ZSR save the same dict): the image tower under
                          ``vision_encoder_state_dict``, OpenAI ``clip`` names (open_clip's), with
                          ``module.`` where the tower was wrapped in DataParallel; its
                          ``state_dict`` key is the visual prompter, not the model
``transformers``          a transformers ``CLIPModel`` folder (``config.json`` and
                          ``model.safetensors``, sharded or not, or ``pytorch_model.bin``): LEAF
                          and other Hugging Face releases, renamed to open_clip's layout
========================= =====================================================================

Sources: open_clip ``factory.load_state_dict`` and ``push_to_hf_hub``; RobustVLM
``train/adversarial_training_clip.py`` (saves ``model.visual``'s state dict) and
``CLIP_eval/eval_utils.load_clip_model``; TeCoA ``finetuning.py`` (``save_checkpoint``);
transformers ``models/clip/modeling_clip.py`` (the names and the q/k/v split converted here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlbench.errors import UserError
from vlbench.registry import Registry

OPEN_CLIP_CONFIG = "open_clip_config.json"
#: open_clip's own order of preference for its Hugging Face weights files
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class Release:
    """What a release's files hold, in open_clip's names."""

    state: dict[str, torch.Tensor]
    #: an open_clip model config the release carries (it then decides the architecture)
    model_cfg: dict[str, Any] | None = None
    #: mean, std, image size the release declares
    preprocess: dict[str, Any] = field(default_factory=dict)
    #: the activation the release declares (transformers' ``hidden_act``), if it does
    quick_gelu: bool | None = None


#: format name -> reader(location) -> Release
readers: Registry[Callable[[Path], Release]] = Registry("release format")


def read_release(fmt: str, location: Path) -> Release:
    """The tensors at ``location`` read as format ``fmt`` (``auto``: :func:`detect` it)."""
    fmt = detect(location) if fmt == "auto" else fmt
    return readers.get(fmt)(location)


# -- reading files ----------------------------------------------------------------------------------
def read_tensors(path: Path) -> Any:
    """A safetensors file, or a torch file loaded with ``weights_only=True``; any failure is a
    one-line error."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip raise many types
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        if _looks_like_html(path):
            reason = "it is a web page, not weights (a download that returned an error or login page)"
        raise UserError(f"unreadable checkpoint {path}: {reason}",
                        "give safetensors or a torch file of tensors (vlbench loads pickles with weights_only=True "
                        "and never runs code in them)") from None


def _looks_like_html(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(512).lstrip().lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html", b"<?xml"))


def _tensors_only(found: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(found, dict) or not found or not all(isinstance(v, torch.Tensor) for v in found.values()):
        kinds = sorted({type(v).__name__ for v in found.values()}) if isinstance(found, dict) else [type(found).__name__]
        raise UserError(f"{path} holds no {what} (found {', '.join(kinds) or 'an empty mapping'})",
                        "check the entry's format: (vlbench ls models lists the formats)")
    return found


def unwrap(found: Any, path: Path, what: str = "state dict") -> dict[str, torch.Tensor]:
    """A state dict, out of a ``{"state_dict": ...}`` wrapper and without ``module.`` prefixes."""
    if isinstance(found, dict) and isinstance(found.get("state_dict"), dict) and "vision_encoder_state_dict" not in found:
        found = found["state_dict"]
    state = _tensors_only(found, path, what)
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def first_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has no {what} ({' or '.join(names)})", "fetch the release again (vlbench models fetch)")


def _json(path: Path) -> dict:
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable {path}: {exc}", "fetch the release again (vlbench models fetch)") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} is not a JSON object", "fetch the release again (vlbench models fetch)")
    return found


# -- the formats ------------------------------------------------------------------------------------
@readers.register("open_clip")
def read_open_clip(location: Path) -> Release:
    return Release(unwrap(read_tensors(location), location))


@readers.register("open_clip_hf")
def read_open_clip_hf(location: Path) -> Release:
    folder = location if location.is_dir() else location.parent
    config = _json(first_file(folder, (OPEN_CLIP_CONFIG,), "open_clip config"))
    if not isinstance(config.get("model_cfg"), dict):
        raise UserError(f"{folder / OPEN_CLIP_CONFIG} has no model_cfg", "it is not open_clip's Hugging Face layout")
    weights = location if location.is_file() and location.name != OPEN_CLIP_CONFIG else \
        first_file(folder, OPEN_CLIP_WEIGHTS, "open_clip weights")
    preprocess = {k: v for k, v in (config.get("preprocess_cfg") or {}).items() if k in ("mean", "std")}
    return Release(unwrap(read_tensors(weights), weights), model_cfg=config["model_cfg"], preprocess=preprocess)


@readers.register("visual_state_dict")
def read_visual_state_dict(location: Path) -> Release:
    state = unwrap(read_tensors(location), location, "image-tower state dict")
    if any(key.startswith("visual.") for key in state):
        raise UserError(f"{location} holds a whole CLIP (its keys start with visual.), not the image tower alone",
                        "set format: open_clip and towers: visual, or towers: full")
    return Release({f"visual.{key}": value for key, value in state.items()})


@readers.register("tecoa")
def read_tecoa(location: Path) -> Release:
    found = read_tensors(location)
    if not isinstance(found, dict) or "vision_encoder_state_dict" not in found:
        keys = ", ".join(sorted(map(str, found))[:6]) if isinstance(found, dict) else type(found).__name__
        raise UserError(f"{location} has no vision_encoder_state_dict (found {keys})",
                        "it is not a TeCoA-code checkpoint; check the entry's format:")
    state = unwrap(found["vision_encoder_state_dict"], location, "image-tower state dict")
    return Release({f"visual.{key}": value for key, value in state.items()})


@readers.register("transformers")
def read_transformers(location: Path) -> Release:
    folder = location if location.is_dir() else location.parent
    config = _json(first_file(folder, (TRANSFORMERS_CONFIG,), "transformers config"))
    if config.get("model_type") != "clip":
        raise UserError(f"{folder / TRANSFORMERS_CONFIG} is model_type {config.get('model_type')!r}, not clip",
                        "vlbench reads transformers CLIPModel folders only")
    weights = first_file(folder, TRANSFORMERS_WEIGHTS, "transformers weights")
    if weights.name.endswith(".index.json"):
        shards = sorted(set(_json(weights).get("weight_map", {}).values()))
        hf: dict[str, torch.Tensor] = {}
        for shard in shards:
            hf.update(_tensors_only(read_tensors(folder / shard), folder / shard, "tensors"))
    else:
        hf = unwrap(read_tensors(weights), weights)
    acts = {config.get(f"{tower}_config", {}).get("hidden_act", "quick_gelu") for tower in ("text", "vision")}
    if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
        raise UserError(f"{folder / TRANSFORMERS_CONFIG} uses activations {sorted(acts)}",
                        "vlbench reads CLIP towers with quick_gelu or gelu, the same in both")
    return Release(from_transformers(hf), quick_gelu=acts == {"quick_gelu"})


_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}


def from_transformers(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict under open_clip's names: separate q/k/v
    projections joined into ``in_proj``, the projections' ``Linear`` weights transposed."""
    out: dict[str, torch.Tensor] = {}
    towers = {"text_model.": "", "vision_model.": "visual."}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue  # a buffer of indices, not a weight
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key.startswith(tuple(towers)):
            tower, rest = next((p, key[len(p):]) for p in towers if key.startswith(p))
            name = _tower_name(rest, towers[tower] == "visual.")
            if name is not None:
                out[towers[tower] + name] = value
    # q, k and v in one in_proj, as torch's MultiheadAttention holds them
    for key in [k for k in hf if ".self_attn.q_proj." in k]:
        tower, rest = next((p, key[len(p):]) for p in towers if key.startswith(p))
        layer = rest.split(".")[2]
        kind = key.rsplit(".", 1)[1]
        parts = [hf[key.replace(".q_proj.", f".{p}_proj.")] for p in ("q", "k", "v")]
        out[f"{towers[tower]}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
    return out


def _tower_name(rest: str, visual: bool) -> str | None:
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding", "final_layer_norm.weight": "ln_final.weight",
             "final_layer_norm.bias": "ln_final.bias"}
    if visual:
        fixed = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                 "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    if rest in fixed:
        return fixed[rest]
    if rest.startswith("encoder.layers.") and not any(f".self_attn.{p}_proj." in rest for p in "qkv"):
        _, _, layer, tail = rest.split(".", 3)
        for old, new in _LAYER.items():
            if tail.startswith(old + "."):
                return f"transformer.resblocks.{layer}.{new}{tail[len(old):]}"
    if rest.startswith("encoder.layers.") and any(f".self_attn.{p}_proj." in rest for p in "qkv"):
        return None  # joined into in_proj by from_transformers
    raise UserError(f"transformers CLIP weight {rest!r} has no open_clip counterpart",
                    "vlbench reads the standard CLIPModel layout only")


# -- detection ----------------------------------------------------------------------------------
def detect(location: Path) -> str:
    """The format of ``location``, from its files and keys (for ``--pretrained`` and
    ``format: auto``)."""
    location = Path(location)
    folder = location if location.is_dir() else None
    if folder is not None:
        if (folder / OPEN_CLIP_CONFIG).is_file():
            return "open_clip_hf"
        if (folder / TRANSFORMERS_CONFIG).is_file():
            return "transformers"
        raise UserError(f"{folder} holds neither {OPEN_CLIP_CONFIG} nor a transformers {TRANSFORMERS_CONFIG}",
                        "point at the checkpoint file itself, or at a release folder")
    if location.name in OPEN_CLIP_WEIGHTS and (location.parent / OPEN_CLIP_CONFIG).is_file():
        return "open_clip_hf"
    found = peek(location)
    if isinstance(found, dict) and "vision_encoder_state_dict" in found:
        return "tecoa"
    keys = list(unwrap(found, location))
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "transformers"
    if any(k.startswith("visual.") for k in keys):
        return "open_clip"
    return "visual_state_dict"


def peek(path: Path) -> Any:
    """What :func:`read_tensors` gives, without reading every tensor's bytes where the file
    allows it (safetensors' header; a zip torch file memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {key: torch.empty(0) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - read_tensors gives the one-line error
            return read_tensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an older (non-zip) torch file cannot be mapped: read it
        return read_tensors(path)
