"""The N:N augmentation bank: one-to-many and many-to-one image-text pairs, filtered by
alignment, computed once and cached (``python -m defenses.nn``).

For every training image the bank holds extra texts and extra images drawn from pools
(Waseda et al., arXiv 2405.18770, "Leveraging Many-To-Many Relationships for Defending
Against Visual-Language Adversarial Attacks", §3-4; research/attacks_nn.md A.6):

- text pools: ``captions`` (the image's other ground-truth captions), ``eda`` (EDA rewrites:
  synonym replacement, random insertion, swap, deletion; Wei & Zou 2019), ``captioner``
  (image → text generation);
- image pools: ``crop`` (random resized crop, scale 0.5-1), ``flip`` (horizontal),
  ``randaugment`` (RandAugment, 2 ops of magnitude 7, as ALBEF's fine-tuning recipe),
  ``painter`` (text → image generation from one of the image's captions).

Alignment filter: an augmented pair is kept only if the frozen base model's cosine between
image and text is at least the original pair's (the best ground-truth caption's) minus
``margin``. Per pool the bank records how many candidates were made, the kept fraction, the
mean alignment of kept pairs, and their diversity (1 − cosine to the original of the same
modality). The paper's exact filter and thresholds are not published (research A.5); this is
vlbench's choice, relative to each image's own clean alignment so that it does not depend on
the model's overall cosine scale.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlbench.monitor.timing import phase
from vlbench.store.artifacts import artifact_path
from vlbench.store.files import atomic_write_json, build_once

from .eda import eda

TEXT_POOLS = ("captions", "eda", "captioner")
IMAGE_POOLS = ("crop", "flip", "randaugment", "painter")
#: Raised whenever a pool or generator changes what it produces, so that cached banks, and
#: the models trained on them, are rebuilt rather than silently reused.
BANK_REVISION = 2
EDA_OPERATIONS = ("sr", "ri", "rs", "rd")


@dataclass(frozen=True)
class AugmentConfig:
    text_pools: tuple = TEXT_POOLS
    image_pools: tuple = IMAGE_POOLS
    per_pool: int = 2          # candidates per pool and image
    margin: float = 0.05       # alignment filter: keep if cos ≥ original cos − margin
    seed: int = 0


@dataclass
class Bank:
    texts: list[list[str]]                 # kept extra texts of each image
    images: torch.Tensor                   # kept extra images, uint8 [M, 3, H, W]
    image_owner: torch.Tensor              # [M] row of the image each one augments
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    def images_of(self, row: int) -> torch.Tensor:
        return (self.image_owner == row).nonzero().squeeze(1)


def _image_candidates(pool: str, image: torch.Tensor, captions: list[str], painter, n: int,
                      rng: random.Random) -> list[torch.Tensor]:
    from torchvision.transforms import v2

    height, width = image.shape[-2:]
    if pool == "crop":
        crop = v2.RandomResizedCrop((height, width), scale=(0.5, 1.0), antialias=True)
        return [crop(image) for _ in range(n)]
    if pool == "flip":
        return [image.flip(-1)]
    if pool == "randaugment":
        augment = v2.RandAugment(num_ops=2, magnitude=7)
        as_bytes = (image * 255).round().to(torch.uint8)
        return [augment(as_bytes).float() / 255 for _ in range(n)]
    if pool == "painter":
        if painter is None:
            return []
        return list(painter.draw([rng.choice(captions) for _ in range(n)], (height, width), rng))
    raise ValueError(f"unknown image pool {pool!r}")


def _text_candidates(pool: str, row: int, images: torch.Tensor, captions: list[str], captioner, n: int,
                     rng: random.Random) -> list[tuple[str, str]]:
    """``(candidate, source caption)`` pairs; the source is what diversity is measured against."""
    if pool == "captions":
        return [(c, captions[0]) for c in captions[1:]]
    if pool == "eda":
        return [(eda(source, rng.choice(EDA_OPERATIONS), rng), source)
                for source in (rng.choice(captions) for _ in range(n))]
    if pool == "captioner":
        if captioner is None:
            return []
        return [(c, captions[0]) for c in captioner.caption(images, [row], n, rng)[0]]
    raise ValueError(f"unknown text pool {pool!r}")


@torch.no_grad()
def build_bank(victim, data, config: AugmentConfig, progress: bool = True, chunk: int = 256) -> Bank:
    """Draw candidates from every pool, filter them by the frozen ``victim``'s alignment.

    Rows are taken ``chunk`` at a time: every candidate of the chunk is drawn first (in row
    order, so the random draws do not depend on the chunk size), then all of them are
    embedded in a few large batches and filtered row by row.
    """
    from vlbench.monitor.progress import progress as progress_bar

    from .generators import generators_for

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)  # torchvision's random transforms draw from the global generator
    captioner, painter = generators_for(data, "auto" if "captioner" in config.text_pools else "none",
                                        "auto" if "painter" in config.image_pools else "none")
    stats = {pool: {"generated": 0, "kept": 0, "alignment": 0.0, "diversity": 0.0}
             for pool in config.text_pools + config.image_pools}
    kept_texts, kept_images, owners = [], [], []
    bar = progress_bar(total=len(data), desc="augment", enabled=progress, leave=False)
    for first in range(0, len(data), chunk):
        rows = list(range(first, min(first + chunk, len(data))))
        drawn = []  # per row: image, captions, {pool: text candidates}, {pool: image candidates}
        for row in rows:
            image = data.images[row][0]
            captions = list(data.captions[row])
            texts = {pool: _text_candidates(pool, row, image[None], captions, captioner, config.per_pool, rng)
                     for pool in config.text_pools}
            images = {pool: _image_candidates(pool, image, captions, painter, config.per_pool, rng)
                      for pool in config.image_pools}
            drawn.append((image, captions, texts, images))
        strings = list(dict.fromkeys(t for _, captions, texts, _ in drawn
                                     for t in captions + [x for pairs in texts.values() for pair in pairs for x in pair]))
        text_embedding = dict(zip(strings, victim.encode_texts(strings)))
        pixels = [image for image, _, _, _ in drawn] + [c.clamp(0, 1) for _, _, _, images in drawn
                                                         for candidates in images.values() for c in candidates]
        embedded_pixels = torch.cat([victim.encode_image(torch.stack(pixels[i:i + 512]).to(victim.device))
                                     for i in range(0, len(pixels), 512)])
        image_embeddings, candidate_embeddings = embedded_pixels[:len(rows)], iter(embedded_pixels[len(rows):])
        for row, (image, captions, texts, images), image_embedding in zip(rows, drawn, image_embeddings):
            caption_embeddings = torch.stack([text_embedding[c] for c in captions])
            threshold = (caption_embeddings @ image_embedding).max() - config.margin
            texts_here = []
            for pool, candidates in texts.items():
                if not candidates:
                    continue
                augmented = torch.stack([text_embedding[c] for c, _ in candidates])
                sources = torch.stack([text_embedding[s] for _, s in candidates])
                alignment = augmented @ image_embedding
                keep = alignment >= threshold
                _tally(stats[pool], keep, alignment, 1 - (augmented * sources).sum(dim=1))
                texts_here += [c for (c, _), k in zip(candidates, keep.tolist()) if k]
            kept_texts.append(texts_here)
            for pool, candidates in images.items():
                if not candidates:
                    continue
                stacked = torch.stack(candidates).clamp(0, 1)
                embedded = torch.stack([next(candidate_embeddings) for _ in candidates])
                alignment = (embedded @ caption_embeddings.T).amax(dim=1)
                keep = alignment >= threshold
                _tally(stats[pool], keep, alignment, 1 - embedded @ image_embedding)
                kept_images.append((stacked[keep.cpu()] * 255).round().to(torch.uint8))
                owners += [row] * int(keep.sum())
        bar.update(len(rows))
    bar.close()
    for pool, tally in stats.items():
        kept = max(tally["kept"], 1)
        stats[pool] = {"generated": tally["generated"], "kept_fraction": tally["kept"] / max(tally["generated"], 1),
                       "alignment": tally["alignment"] / kept, "diversity": tally["diversity"] / kept}
    height, width = data.images[0][0].shape[-2:]
    images = torch.cat(kept_images) if kept_images else torch.empty(0, 3, height, width, dtype=torch.uint8)
    return Bank(kept_texts, images, torch.as_tensor(owners, dtype=torch.long), stats)


def _tally(tally: dict, keep: torch.Tensor, alignment: torch.Tensor, diversity: torch.Tensor) -> None:
    tally["generated"] += len(keep)
    tally["kept"] += int(keep.sum())
    tally["alignment"] += float(alignment[keep].sum())
    tally["diversity"] += float(diversity[keep].sum())


def cached_bank(victim, data, config: AugmentConfig, progress: bool = True) -> tuple[Bank, Path]:
    """The bank for (base model, dataset, split, config), built once and cached."""
    from safetensors.torch import load_file, save_file

    key = {"model": victim.fingerprint(), "precision": victim.precision, "dataset": data.name, "split": data.spec.split,
           "options": data.spec.options, "n": len(data), "config": asdict(config),
           "revision": BANK_REVISION}
    folder, key = artifact_path("augment", key)

    def cached() -> Bank | None:
        try:
            tensors = load_file(str(folder / "images.safetensors"))
            meta = json.loads((folder / "bank.json").read_text())
            return Bank(meta["texts"], tensors["images"], tensors["owner"], meta["stats"])
        except Exception:  # missing or damaged: build it (again)
            return None

    def build() -> Bank:
        with phase("N:N augmentation bank"):
            bank = build_bank(victim, data, config, progress)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".bank-", dir=folder.parent))
        save_file({"images": bank.images.contiguous(), "owner": bank.image_owner},
                  str(staging / "images.safetensors"))
        atomic_write_json(staging / "bank.json", {"key": key, "texts": bank.texts, "stats": bank.stats})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        return bank

    return build_once(folder.with_name(folder.name + ".lock"), cached, build, "building the N:N bank"), folder
