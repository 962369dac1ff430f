"""Small random-weight CLIPs written in each format robust CLIPs are released in, for the
loading and fetching tests.

Every writer lays the files out as the release it imitates does (see
:mod:`vlbench.models.formats`): open_clip state dicts (torch and safetensors), open_clip's
Hugging Face layout, RobustVLM's image-tower state dict, the TeCoA code's checkpoint dict
with DataParallel's ``module.`` prefixes, and a transformers ``CLIPModel`` folder. The model
is a two-layer ViT with OpenAI's activation (x·σ(1.702x)), registered with open_clip as
:data:`TINY_ARCH` (GELU, as open_clip's ``ViT-B-32``: an entry says ``quick_gelu: true``) and
``TINY_ARCH-quickgelu`` (as its ``ViT-B-32-quickgelu``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_ARCH = "vlbench-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_arch(folder: Path) -> None:
    """Make ``open_clip.create_model(TINY_ARCH)`` (and ``-quickgelu``) work (open_clip reads
    every JSON in ``folder``)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "quick_gelu"}))
    (folder / f"{TINY_ARCH}-quickgelu.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)


def random_clip(seed: int):
    """A randomly initialised tiny open_clip CLIP with OpenAI's activation, in eval mode."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG).eval()
    with torch.no_grad():  # open_clip zero-initialises some projections; make every tensor count
        for tensor in model.state_dict().values():
            if tensor.dtype.is_floating_point and tensor.abs().sum() == 0:
                tensor.normal_(0, 0.02)
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_open_clip(model, path: Path, *, wrapped: bool = False, data_parallel: bool = False) -> Path:
    """An open_clip state dict: ``.safetensors`` by suffix, else a torch file; optionally under
    ``{"state_dict": ...}`` and with DataParallel's ``module.`` prefixes."""
    tensors = state(model)
    if data_parallel:
        tensors = {f"module.{k}": v for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "epoch": 2} if wrapped else tensors, path)
    return path


def write_open_clip_hf(model, folder: Path, *, weights: str = "open_clip_model.safetensors") -> Path:
    """open_clip's Hugging Face layout (``push_to_hf_hub``): the config and one weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    write_open_clip(model, folder / weights)
    return folder


def write_visual_state_dict(model, path: Path) -> Path:
    """RobustVLM's release: ``model.visual``'s state dict (``conv1.weight`` ... ``proj``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.visual.state_dict().items()}, path)
    return path


def write_tecoa(model, path: Path) -> Path:
    """The TeCoA code's checkpoint: the image tower under ``vision_encoder_state_dict`` with the
    ``module.`` of a DataParallel-wrapped tower, beside the visual prompter (``state_dict``),
    the optimiser and the epoch (``finetuning.py``'s ``save_checkpoint``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    visual = {f"module.{k}": v.detach().clone() for k, v in model.visual.state_dict().items()}
    torch.save({"epoch": 10, "state_dict": {"prompt": torch.zeros(3, 4)}, "add_prompter": None,
                "vision_encoder_state_dict": visual, "best_acc1": 38.2,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "momentum": 0.9, "params": [0, 1]}]}}, path)
    return path


def hf_clip(seed: int):
    """A randomly initialised transformers ``CLIPModel`` of the tiny architecture."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def write_transformers(model, folder: Path) -> Path:
    """A transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``)."""
    model.save_pretrained(folder)
    return folder
