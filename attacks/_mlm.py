"""Masked language models for word-substitution attacks (BERT-Attack).

:func:`load_masked_lm` loads a BERT-style masked LM through transformers from a local folder
or the Hugging Face cache (``bert-base-uncased`` by default, as in the Co-Attack, SGA and
MMCoA code), never from the network, or — with the name ``world`` — a small BERT trained on
the synthetic world's captions, so substitutions on the world are meaningful offline. The
world's is shipped with the package beside the world CLIP (``vlbench/world/released/``,
checked against the sha256 of its files): trained on another CPU it would propose other
substitutes, and every user's BERT-Attack cells would differ. :func:`world_mlm` trains it
(``vlbench world pretrain --release`` ships the result).

:class:`MaskedLM` exposes what BERT-Attack needs: words → sub-token spans, the top-k
predictions and logits at every position of one unmasked forward pass, and the perplexity
used to rank multi-piece substitutes (Li et al., EMNLP 2020, §3.2).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlbench.errors import UserError
from vlbench.monitor.timing import phase
from vlbench.store.artifacts import artifact_path
from vlbench.store.files import atomic_write_json, build_once

WORLD_MLM = "world"
#: the weights file of a saved masked LM (transformers' safetensors name)
MLM_WEIGHTS = "model.safetensors"
#: the release's record: training config, command, machine, and every file's sha256
MLM_RECORD = "vlbench.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class MaskedLM:
    """A tokenizer and a masked LM, with the operations BERT-Attack uses."""

    def __init__(self, tokenizer, model, name: str):
        self.tokenizer, self.model, self.name = tokenizer, model.eval(), name
        self.model.requires_grad_(False)
        #: results its users derive from it alone (BERT-Attack's substitutes per caption)
        self.memo: dict = {}

    def word_pieces(self, words: list[str], max_length: int = 30) -> tuple[list[int], list[tuple[int, int]]]:
        """Sub-token ids (with [CLS]/[SEP]) and each word's ``(start, end)`` span in them.

        Words whose pieces fall beyond ``max_length`` get an empty span (never substituted).
        """
        ids = [self.tokenizer.cls_token_id]
        spans = []
        for word in words:
            pieces = self.tokenizer.encode(word, add_special_tokens=False)
            start = len(ids)
            if start + len(pieces) > max_length - 1:
                spans.append((start, start))
                continue
            ids.extend(pieces)
            spans.append((start, len(ids)))
        ids.append(self.tokenizer.sep_token_id)
        return ids, spans

    @torch.no_grad()
    def top_k(self, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits and ids of the k best tokens at every position of one forward pass."""
        return self.top_k_many([ids], k)[0]

    @torch.no_grad()
    def top_k_many(self, sequences: list[list[int]], k: int, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`top_k` of several sequences, in padded batches (the padding is masked, so
        each sequence's logits are its own)."""
        results = []
        for first in range(0, len(sequences), batch_size):
            chunk = sequences[first:first + batch_size]
            length = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), length), self.tokenizer.pad_token_id)
            for row, sequence in enumerate(chunk):
                ids[row, :len(sequence)] = torch.tensor(sequence)
            logits = self.model(input_ids=ids, attention_mask=ids != self.tokenizer.pad_token_id).logits
            values, indices = logits.topk(k, dim=-1)
            results += [(values[row, :len(sequence)], indices[row, :len(sequence)]) for row, sequence in enumerate(chunk)]
        return results

    @torch.no_grad()
    def perplexity(self, sequences: torch.Tensor) -> torch.Tensor:
        """exp(mean cross-entropy of each sequence's own tokens), one per row."""
        logits = self.model(sequences).logits
        losses = F.cross_entropy(logits.flatten(0, 1), sequences.flatten(), reduction="none")
        return losses.view(sequences.shape).mean(dim=1).exp()

    def token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    def join(self, token_ids: list[int]) -> str:
        return self.tokenizer.convert_tokens_to_string([self.token(t) for t in token_ids]).strip()


def load_masked_lm(name_or_path: str = "bert-base-uncased") -> MaskedLM:
    """The masked LM of a folder or cache entry, loaded once per process and shared by every
    attack that names it (with its memo)."""
    if name_or_path == WORLD_MLM:
        return _shared(str(released_world_mlm()), WORLD_MLM)
    return _shared(str(name_or_path), name_or_path)


def release_manifest(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a saved masked LM folder (its record aside)."""
    import hashlib

    return {item.name: hashlib.sha256(item.read_bytes()).hexdigest()
            for item in sorted(Path(folder).iterdir()) if item.is_file() and item.name != MLM_RECORD}


def released_world_mlm() -> Path:
    """The world MLM shipped with the package, its files checked against their recorded sha256."""
    import json

    from vlbench.store.paths import package_file
    from vlbench.world.pretrain import RELEASED_MLM

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


_loaded: dict[tuple[str, str], MaskedLM] = {}


def _shared(path: str, name: str) -> MaskedLM:
    if (path, name) not in _loaded:
        _loaded[(path, name)] = _load_folder(path, name)
    return _loaded[(path, name)]


def _quiet_transformers() -> None:
    # transformers draws its own bars while loading and saving weights: noise in a log
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_folder(name_or_path: str | Path, name: str) -> MaskedLM:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(str(name_or_path), local_files_only=True,
                                                     use_safetensors=True)  # never a pickle
    except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"masked LM {name!r} is not available offline ({reason})",
                        f"download it on a connected machine (huggingface-cli download {name}) into the "
                        f"Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
                        "or set the attack's mlm: to a local folder, or mlm: world on the synthetic world") from None
    return MaskedLM(tokenizer, model, name)


# -- the world's masked LM ----------------------------------------------------------------
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
            _shared(str(folder), WORLD_MLM)  # the copy every attack then shares: loaded once
            return folder
        except UserError:
            return None  # damaged: train again

    def train() -> Path:
        started = time.perf_counter()
        with phase("world MLM training"):
            tokenizer, model, loss = train_world_mlm(config, progress)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mlm-", dir=folder.parent))
        _quiet_transformers()
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging, safe_serialization=True)
        atomic_write_json(staging / MLM_RECORD, {"config": asdict(config), "final_loss": loss,
                                                     "seconds": round(time.perf_counter() - started, 1)})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        _loaded.pop((str(folder), WORLD_MLM), None)  # a copy loaded before is stale
        return folder

    return build_once(folder.with_name(folder.name + ".lock"), usable, train, "training the world MLM")
