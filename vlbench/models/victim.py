"""The victim model: an open_clip model that takes pixels in [0, 1].

Images enter :class:`Victim` as float pixels in [0, 1] at the dataset's own resolution;
resizing to the model's input size and mean/std normalisation happen inside the forward
pass, so every attack's epsilon is in pixel units (as in TeCoA's ``clip_img_preprocessing``
and FARE's model wrapper). :mod:`vlbench.models.factory` builds a Victim from any model card
entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlbench.models.precision import autocast
from vlbench.store.files import stable_hash, tensor_fingerprint

#: the world CLIP's open_clip architecture (its model card entry is ``world-clip``)
WORLD_MODEL = "vlbench-world"
#: open_clip architecture configs of vlbench's own models (the world CLIP)
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_registered = False


def register_model_configs() -> None:
    """Make ``open_clip.create_model('vlbench-world')`` work (idempotent)."""
    global _registered
    import open_clip

    if not _registered or WORLD_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def world_model_config() -> dict:
    """The world CLIP's architecture, as open_clip reads it from the JSON file."""
    import json

    return json.loads((MODEL_CONFIG_DIR / f"{WORLD_MODEL}.json").read_text())


class TokenRows(dict):
    """Token rows by string, each string tokenised once (the tokenizers are pure Python and
    text attacks re-score the same strings many times). Shared by a Victim's deep copies,
    whose tokenizer is the same; cleared when it grows past ``limit`` strings."""

    limit = 200_000

    def __deepcopy__(self, memo):
        return self


def _trims_padding(model: nn.Module) -> bool:
    """Whether trailing padding can be cut from ``model``'s text input without changing its
    output: an open_clip ``CLIP`` text tower with a causal mask and end-of-text pooling, where
    no position attends to the padding after it."""
    try:
        from open_clip.model import CLIP
    except ImportError:
        return False
    return (type(model) is CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax")


class Victim(nn.Module):
    """Wraps an open_clip ``CLIP`` so that images are pixels in [0, 1]."""

    def __init__(self, model: nn.Module, tokenizer, name: str, pretrained: str | None,
                 precision: str = "fp32", mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        # Convolutions run 25-30 % faster on CPUs in NHWC (measured on the world model, AVX2
        # and AVX-512); the weights' values, and so the fingerprint, do not change.
        self.model = model.to(memory_format=torch.channels_last)
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        #: the forward passes' precision (vlbench.models.precision); features are always float32
        self.precision = precision
        self._token_rows = TokenRows()
        self._trim = _trims_padding(model)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        mean = mean or cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = std or cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._fingerprint: str | None = None
        #: an inference-time change to the pixels before the model (a defense's input
        #: transform, :meth:`set_input_transform`), and what names it in the fingerprint
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._input_identity: Any = None
        # held in a tuple so that the module does not register it as a submodule
        self._undefended: tuple["Victim", ...] = ()

    # -- encoders ---------------------------------------------------------------------------
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """The defense's input transform (if any), then resize to the model's input size and
        normalise; differentiable wherever the transform is."""
        if self.input_transform is not None:
            pixels = self.input_transform(pixels)
        if pixels.shape[-2:] != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False)
        return ((pixels - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pixels = self.preprocess(pixels)
        with autocast(self.precision, pixels.device):
            features = self.model.encode_image(pixels)
        features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with autocast(self.precision, tokens.device):
            features = self._text_features(tokens)
        features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text``; for a causal open_clip text tower, on the tokens up to the
        batch's longest text (the pad id is 0). Captions are a fraction of the context (about
        20 of 77 tokens for Flickr30k on CLIP), and the positions after a text's end-of-text
        token never reach its features, so this is the same result for less work."""
        model = self.model
        length = int((tokens != 0).sum(dim=1).max()) if self._trim and len(tokens) else tokens.shape[-1]
        if length >= tokens.shape[-1]:
            return model.encode_text(tokens)
        tokens = tokens[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]
        if isinstance(model.text_projection, nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection if model.text_projection is not None else x

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        rows = self._token_rows
        missing = list(dict.fromkeys(t for t in texts if t not in rows))
        if missing:
            if len(rows) + len(missing) > rows.limit:
                rows.clear()
            rows.update(zip(missing, self.tokenizer(missing)))
        if not texts:
            return self.tokenizer([]).to(self.device)
        return torch.stack([rows[t] for t in texts]).to(self.device)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised embeddings of raw strings, in batches, without gradients."""
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                chunks.append(self.encode_text(self.tokenize(texts[start:start + batch_size])))
        return torch.cat(chunks) if chunks else torch.empty(0)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    # -- identity -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A hash of the weights and the input transform: the cache key of everything
        computed with this model."""
        if self._fingerprint is None:
            weights = tensor_fingerprint(self.model.state_dict())
            self._fingerprint = (weights if self.input_transform is None
                                 else stable_hash({"weights": weights, "input_transform": self._input_identity}))
        return self._fingerprint

    def set_input_transform(self, transform: Callable[[torch.Tensor], torch.Tensor], identity: Any) -> None:
        """Apply ``transform`` to the pixels (in [0, 1], before resizing) of every image the
        model sees; ``identity`` (JSON-able: the transform's name and settings) joins the
        fingerprint, so nothing computed without the transform is reused with it."""
        self.input_transform, self._input_identity = transform, identity
        self._fingerprint = None

    @property
    def undefended(self) -> "Victim | None":
        """The undefended model this one was made from (a transfer attack's surrogate), if known."""
        return self._undefended[0] if self._undefended else None

    def set_undefended(self, base: "Victim | None") -> None:
        # not a property setter: nn.Module would register a Victim assigned to an attribute
        # as a submodule, and its weights would join this model's
        self._undefended = () if base is None else (base,)

    def weights_changed(self) -> None:
        """Call after training: the fingerprint is recomputed on next use."""
        self._fingerprint = None
