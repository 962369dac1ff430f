"""What the cells of one victim share during evaluation: the run's context (victim, caches,
batch size, seed), clean image and prompt embeddings read through the disk cache, zero-shot
class weights, per-sample random noise, and the in-memory memo of text embeddings and
deterministic attack outputs.

Zero-shot classification follows CLIP (Radford et al. 2021, §3.1.4) as used by TeCoA and
CLIP_benchmark: each class's prompt embeddings (one per template) are L2-normalised, averaged
and renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from vlbench.api import Attack
from vlbench.data.datasets import EvalData, subset_hash
from vlbench.data.loading import EvalLoaders
from vlbench.evaluation.perturb import SampleNoise
from vlbench.models.victim import Victim
from vlbench.monitor.progress import progress as progress_bar
from vlbench.store.embeddings import EmbeddingCache
from vlbench.store.files import stable_hash


@dataclass
class EvalContext:
    victim: Victim
    cache: EmbeddingCache
    batch_size: int = 256
    progress: bool = True
    seed: int = 0
    #: what the cells of this victim share (see :class:`EvalMemo`)
    memo: "EvalMemo | None" = None
    #: the image loaders (and their worker pools) the cells of this victim share
    loaders: EvalLoaders | None = None

    def __post_init__(self):
        if self.memo is None:
            self.memo = EvalMemo(self.victim)
        if self.loaders is None:
            self.loaders = EvalLoaders()


def image_batches(data: EvalData, indices: list[int], batch_size: int, desc: str | None = None,
                  progress: bool = False, loaders: EvalLoaders | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked ``(images, targets)`` batches of ``data`` restricted to ``indices``, read through
    ``loaders`` (a DataLoader; with workers where the run asks for them)."""
    batches = (loaders or EvalLoaders()).batches(data.images, indices, batch_size)
    total = (len(indices) + batch_size - 1) // batch_size
    yield from progress_bar(batches, desc=desc, leave=False, enabled=progress, total=total)


def data_key(ctx: EvalContext, data: EvalData, indices: list[int]) -> dict[str, Any]:
    return {"model": ctx.victim.fingerprint(), "precision": ctx.victim.precision,
            "dataset": data.name, "split": data.spec.split,
            "options": data.spec.options, "subset": subset_hash(data.name, data.spec.split, indices),
            "transform": data.spec.transform_id()}


def clean_image_embeddings(ctx: EvalContext, data: EvalData, indices: list[int]) -> torch.Tensor:
    def compute() -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for images, _ in image_batches(data, indices, ctx.batch_size, f"embed {data.name}", ctx.progress,
                                           ctx.loaders):
                chunks.append(ctx.victim.encode_image(images.to(ctx.victim.device)).cpu())
        return torch.cat(chunks)

    return ctx.cache.get_or_compute({"kind": "image-embeddings", **data_key(ctx, data, indices)}, compute)


def class_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Every class × template prompt, class-major."""
    return [template.format(c=name) for name in classnames for template in templates]


def weights_from_prompt_embeddings(embeddings: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Average each class's normalised prompt embeddings and renormalise: [C, d]."""
    return F.normalize(embeddings.view(n_classes, -1, embeddings.shape[-1]).mean(dim=1), dim=-1)


def classifier_weights(victim: Victim, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot class embeddings [C, d]: normalise per prompt, average, renormalise."""
    embeddings = victim.encode_texts(class_prompts(classnames, templates))
    return weights_from_prompt_embeddings(embeddings, len(classnames))


def cached_prompt_embeddings(ctx: EvalContext, data: EvalData) -> torch.Tensor:
    """Normalised embeddings of every class × template prompt (class-major), cached on disk;
    the victim's shared text embeddings take them as they are, so every cell and stage that
    starts from the clean prompts starts from the same numbers."""
    prompts = class_prompts(data.classnames, data.templates)
    key = {"kind": "prompt-embeddings", "model": ctx.victim.fingerprint(), "precision": ctx.victim.precision,
           "classnames": data.classnames, "templates": data.templates}
    embeddings = ctx.cache.get_or_compute(key, lambda: ctx.victim.encode_texts(prompts).cpu())
    ctx.memo.embed.seed(prompts, embeddings)
    return embeddings


def cached_classifier(ctx: EvalContext, data: EvalData) -> torch.Tensor:
    """Zero-shot class embeddings [C, d] from :func:`cached_prompt_embeddings`."""
    return weights_from_prompt_embeddings(cached_prompt_embeddings(ctx, data), len(data.classnames))


class TextEmbeddings:
    """Normalised text embeddings from a frozen victim, each distinct string encoded once.

    Text attacks score thousands of candidate strings, many of them repeated (the same
    substitution proposed for several captions, a clean text scored in every round); an
    objective keeps one of these for as long as its victim's weights do not change.
    """

    #: strings kept at most; past it the memo starts again (a bound for very large galleries)
    limit = 1_000_000

    def __init__(self, victim: Victim):
        self.victim = victim
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if missing:
            if len(self.rows) + len(missing) > self.limit:
                self.rows.clear()
            self.rows.update(zip(missing, self.victim.encode_texts(missing)))
        if not texts:
            return torch.empty(0)
        return torch.stack([self.rows[t] for t in texts])

    def seed(self, texts: list[str], embeddings: torch.Tensor) -> None:
        """Take ``embeddings`` (e.g. read from the disk cache) as those of ``texts``."""
        self.rows.update(zip(texts, embeddings.to(self.victim.device)))


class EvalMemo:
    """What the cells of one victim share while its weights stay fixed: the embedding of
    every text any of them scored, and the outputs of deterministic attacks by everything
    they were given. BERT-Attack on the captions is SGA's first stage and scores the same
    candidate strings as Co-Attack's; the image stage of ``mmcoa-attack`` is the ``pgd`` cell's
    attack on the same images and objective. Each is computed once per victim."""

    #: adversarial images kept at most (bytes): a full-size test set at 224 px would not fit
    #: in memory, and is then recomputed where a stage repeats a cell
    max_image_bytes = 1 << 29

    def __init__(self, victim: Victim):
        self.embed = TextEmbeddings(victim)
        self.results: dict = {}
        self.image_bytes = 0

    def attack(self, attack: Attack, objective, inputs_key: str, compute):
        """``compute()``, or its earlier result for the same attack, objective and inputs."""
        identity = getattr(objective, "identity", None)
        if not attack.deterministic or identity is None:
            return compute()
        key = (attack.modality, stable_hash(attack.config(), 32), identity(), inputs_key)
        if key in self.results:
            return self.results[key]
        result = compute()
        size = sum(t.nbytes for t in (result if isinstance(result, tuple) else (result,)) if torch.is_tensor(t))
        if self.image_bytes + size <= self.max_image_bytes:
            self.results[key] = result
            self.image_bytes += size
        return result


def sample_noise(ctx: EvalContext, data: EvalData, indices: list[int]) -> SampleNoise:
    """Random starts keyed by (run seed, dataset, sample index): a sample's start does not
    depend on its batch or on the attack, so compositions can be compared per sample and
    attacks that are the same computation give the same images."""
    return SampleNoise(int(stable_hash({"seed": ctx.seed, "dataset": data.name}, 15), 16), indices)
