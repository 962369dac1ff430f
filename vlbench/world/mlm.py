"""The synthetic world's masked language model: a small BERT trained on world captions, so
that BERT-Attack's substitutions on the world are meaningful offline (the attacks read it as
``mlm: world``, through :func:`attacks._mlm.load_masked_lm`).

It ships with the package beside the world CLIP (``vlbench/world/released/world-mlm/``, each
file checked against the sha256 its record holds, :func:`released_world_mlm`): trained on
another CPU it would propose other substitutes, and every user's BERT-Attack cells would
differ. :func:`world_mlm` trains it into the cache, and ``vlbench world pretrain --release``
(:func:`vlbench.world.pretrain.release`) ships that result.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlbench.errors import UserError
from vlbench.monitor.timing import phase
from vlbench.store.artifacts import artifact_path
from vlbench.store.files import atomic_write_json, build_once
from vlbench.store.paths import package_file

#: the weights file of a saved masked LM (transformers' safetensors name)
MLM_WEIGHTS = "model.safetensors"
#: the release's record: training config, command, machine, and every file's sha256
MLM_RECORD = "vlbench.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: where the released world MLM lives, relative to the vlbench package folder
RELEASED_MLM = "world/released/world-mlm"


def quiet_transformers() -> None:
    # transformers draws its own bars while loading and saving weights: noise in a log
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def release_manifest(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a saved masked LM folder (its record aside)."""
    return {item.name: hashlib.sha256(item.read_bytes()).hexdigest()
            for item in sorted(Path(folder).iterdir()) if item.is_file() and item.name != MLM_RECORD}


def released_world_mlm() -> Path:
    """The world MLM shipped with the package, its files checked against their recorded sha256."""
    folder = package_file(RELEASED_MLM)
    fix = "reinstall vlbench (pip install -e .), or release it again with `vlbench world pretrain --release`"
    try:
        recorded = json.loads((folder / MLM_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"the world MLM's record {folder / MLM_RECORD} is missing or unreadable", fix) from None
    found = release_manifest(folder)
    if found != recorded:
        differing = sorted(set(found) ^ set(recorded) | {k for k in found if recorded.get(k) != found[k]})
        raise UserError(f"the world MLM in {folder} differs from its record ({', '.join(differing)})", fix)
    return folder


# -- training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldMLMConfig:
    hidden: int = 96
    layers: int = 2
    heads: int = 4
    #: 300 steps give the same BERT-Attack candidates as 1,500 (every attribute word of a
    #: test caption gets 10 substitutes, 62 % of them values of its own attribute, in both)
    #: in a fifth of the time
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    n_scenes: int = 4000
    seed: int = 0


def _world_captions(config: WorldMLMConfig) -> list[str]:
    from vlbench.world.scenes import describe, random_caption, sample_scenes

    rng = random.Random(config.seed)
    captions = []
    for scene in sample_scenes("train", config.n_scenes, config.seed):
        captions.extend(describe(scene))
        captions.append(random_caption(scene, rng))
    return captions


def _world_vocabulary(captions: list[str]) -> dict[str, int]:
    from vlbench.evaluation.words import split_words

    words = sorted({w for caption in captions for w in split_words(caption)})
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}


def train_world_mlm(config: WorldMLMConfig, progress: bool = True):
    """Train a small BERT on world captions with the standard 80/10/10 MLM masking."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from vlbench.evaluation.words import split_words
    from vlbench.training.loop import Schedule, fit

    torch.manual_seed(config.seed)
    captions = _world_captions(config)
    tokenizer = BertTokenizer(vocab=_world_vocabulary(captions), do_lower_case=True)
    encoded = [tokenizer.encode(" ".join(split_words(c))) for c in captions]
    length = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
    for row, sequence in enumerate(encoded):
        ids[row, :len(sequence)] = torch.tensor(sequence)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=4 * config.hidden,
        max_position_embeddings=max(64, length)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    special = torch.tensor([tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id])

    def lr_at(step: int, group: dict) -> float:  # 100 warmup steps, then linear decay
        return config.lr * min(1.0, (step + 1) / 100) * (1 - step / config.steps)

    def loss_at(step: int) -> torch.Tensor:
        batch = ids[torch.randint(len(ids), (config.batch_size,), generator=generator)]
        chosen = (torch.rand(batch.shape, generator=generator) < 0.15) & ~torch.isin(batch, special)
        labels = batch.masked_fill(~chosen, -100)
        draw = torch.rand(batch.shape, generator=generator)
        inputs = batch.clone()
        inputs[chosen & (draw < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (draw >= 0.8) & (draw < 0.9)
        inputs[swap] = torch.randint(len(SPECIAL_TOKENS), len(tokenizer.vocab), (int(swap.sum()),),
                                     generator=generator)
        return model(input_ids=inputs, attention_mask=batch != tokenizer.pad_token_id, labels=labels).loss

    summary = fit(model, model.parameters(), Schedule(config.steps, config.lr), loss_at, desc="world MLM",
                           progress=progress, batch_size=config.batch_size, optimizer=optimizer, lr_at=lr_at)
    return tokenizer, model, summary["last_loss"]


def _world_mlm_folder(config: WorldMLMConfig) -> Path:
    from vlbench.world.scenes import CAPTIONS_VERSION

    return artifact_path("world", {**asdict(config), "captions": CAPTIONS_VERSION}, trained=True, prefix="mlm-",
                         digits=16)[0]


def world_mlm(config: WorldMLMConfig | None = None, force: bool = False, progress: bool = True) -> Path:
    """The folder of the world MLM trained on this machine (cached), training it first if
    needed (atomically; one process trains while others sharing the cache wait for it). The
    attacks read the released one (:func:`released_world_mlm`); this is how it is rebuilt."""
    config = config or WorldMLMConfig()
    folder = _world_mlm_folder(config)

    def usable() -> Path | None:
        if not folder.is_dir() or force:
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(folder / MLM_WEIGHTS), "pt"):
                return folder
        except Exception:  # noqa: BLE001 - missing or damaged: train again
            return None

    def train() -> Path:
        started = time.perf_counter()
        with phase("world MLM training"):
            tokenizer, model, loss = train_world_mlm(config, progress)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mlm-", dir=folder.parent))
        quiet_transformers()
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging, safe_serialization=True)
        atomic_write_json(staging / MLM_RECORD, {"config": asdict(config), "final_loss": loss,
                                                     "seconds": round(time.perf_counter() - started, 1)})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        return folder

    return build_once(folder.with_name(folder.name + ".lock"), usable, train, "training the world MLM")
