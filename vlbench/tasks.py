"""Evaluation tasks: zero-shot classification and image-text retrieval, clean and attacked.

Zero-shot classification follows CLIP (Radford et al. 2021, §3.1.4) as used by TeCoA and
CLIP_benchmark: each class's prompt embeddings (one per template) are L2-normalised, averaged
and renormalised; logits are ``logit_scale * cos(image, class)``; the metric is top-1 accuracy.
Retrieval reports Recall@{1,5,10} both ways with several captions per image: an image query
is correct if any of its captions is in the top K, a caption query if its image is.

Each task also supplies the objective an image attack maximises: cross-entropy over the
task's logits for classification, and for retrieval the matching contrastive objective —
the image→text InfoNCE loss over the gallery captions with all of the image's captions as
positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .api import Attack, ImageAttack, MultimodalAttack, NoAttack, TextAttack
from .cache import EmbeddingCache
from .datasets import EvalData, subset_hash
from .errors import UserError
from .io import stable_hash
from .model import Victim
from .perturb import SampleNoise

RECALL_KS = (1, 5, 10)


@dataclass
class EvalContext:
    victim: Victim
    cache: EmbeddingCache
    batch_size: int = 256
    progress: bool = True
    seed: int = 0


def image_batches(data: EvalData, indices: list[int], batch_size: int,
                  desc: str | None = None, progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked ``(images, targets)`` batches of ``data`` restricted to ``indices``."""
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        items = [data.images[i] for i in indices[start:start + batch_size]]
        images = torch.stack([item[0] for item in items])
        targets = torch.as_tensor([int(item[1]) for item in items])
        yield images, targets


def _data_key(ctx: EvalContext, data: EvalData, indices: list[int]) -> dict[str, Any]:
    return {"model": ctx.victim.fingerprint(), "dataset": data.name, "split": data.spec.split,
            "options": data.spec.options, "subset": subset_hash(data.name, data.spec.split, indices),
            "transform": data.spec.transform_id()}


def clean_image_embeddings(ctx: EvalContext, data: EvalData, indices: list[int]) -> torch.Tensor:
    def compute() -> torch.Tensor:
        chunks = []
        with torch.no_grad():
            for images, _ in image_batches(data, indices, ctx.batch_size, f"embed {data.name}", ctx.progress):
                chunks.append(ctx.victim.encode_image(images.to(ctx.victim.device)).cpu())
        return torch.cat(chunks)

    return ctx.cache.get_or_compute({"kind": "image-embeddings", **_data_key(ctx, data, indices)}, compute)


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


def cached_classifier(ctx: EvalContext, data: EvalData) -> torch.Tensor:
    key = {"kind": "classifier", "model": ctx.victim.fingerprint(), "classnames": data.classnames,
           "templates": data.templates}
    return ctx.cache.get_or_compute(
        key, lambda: classifier_weights(ctx.victim, data.classnames, data.templates).cpu())


def _noise_subset(noise: SampleNoise | None, rows: torch.Tensor) -> SampleNoise | None:
    return None if noise is None else noise.subset(rows)


class ClassificationObjective:
    """Cross-entropy of ``logit_scale * cos(image, class)`` against the true class.

    ``rows`` (optional) says which samples of the batch ``images`` holds, for attacks that
    work on a shrinking set of still-correct samples; ``noise`` keys random starts by sample.
    """

    def __init__(self, victim: Victim, weights: torch.Tensor, labels: torch.Tensor,
                 noise: SampleNoise | None = None):
        self.victim, self.weights, self.labels, self.noise = victim, weights, labels, noise

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.logit_scale * self.victim.encode_image(images) @ self.weights.T

    def subset(self, rows: torch.Tensor) -> "ClassificationObjective":
        return ClassificationObjective(self.victim, self.weights, self.labels[rows], _noise_subset(self.noise, rows))

    def labels_for(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.labels if rows is None else self.labels[rows]

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(images), self.labels_for(rows), reduction="none")

    def correct(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(images).argmax(dim=1) == self.labels_for(rows)


class RetrievalObjective:
    """Image→text InfoNCE over the gallery captions, with every own caption a positive."""

    def __init__(self, victim: Victim, text_embeddings: torch.Tensor, positives: torch.Tensor,
                 noise: SampleNoise | None = None):
        self.victim, self.texts, self.positives, self.noise = victim, text_embeddings, positives, noise

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.logit_scale * self.victim.encode_image(images) @ self.texts.T

    def subset(self, rows: torch.Tensor) -> "RetrievalObjective":
        return RetrievalObjective(self.victim, self.texts, self.positives[rows], _noise_subset(self.noise, rows))

    def _positives(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.positives if rows is None else self.positives[rows]

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(images)
        positive = logits.masked_fill(~self._positives(rows), float("-inf"))
        return torch.logsumexp(logits, dim=1) - torch.logsumexp(positive, dim=1)

    def correct(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        top = self.logits(images).argmax(dim=1)
        return self._positives(rows)[torch.arange(len(top)), top]


class EmbeddingShiftObjective:
    """Untargeted, image-free text objective of Co-Attack's ``BertAttack`` (the one MMCoA
    uses on class prompts): KL(softmax(g(t)) ‖ softmax(g(t'))) over embedding dimensions of
    the normalised clean and candidate text embeddings."""

    def __init__(self, victim: Victim, texts: list[str], clean_embeddings: torch.Tensor):
        self.victim, self.texts = victim, texts
        self.clean_log_probs = F.log_softmax(clean_embeddings, dim=-1)

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        log_q = F.log_softmax(self.victim.encode_texts(candidates).to(self.clean_log_probs.device), dim=-1)
        log_p = self.clean_log_probs[row]
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class ImageGuidedTextObjective:
    """SGA's image-guided text objective: the negative cosine between the candidate caption
    and the embedding of the image it describes (Lu et al., ICCV 2023, §3.3)."""

    def __init__(self, victim: Victim, texts: list[str], paired_image_embeddings: torch.Tensor):
        self.victim, self.texts, self.images = victim, texts, paired_image_embeddings

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        return -(self.victim.encode_texts(candidates).to(self.images.device) @ self.images[row])


def _attack_texts(attack: TextAttack, ctx: EvalContext, objective, generator) -> list[str]:
    adversarial = attack.perturb_texts(ctx.victim, objective, generator)
    if len(adversarial) != len(objective.texts) or not all(isinstance(t, str) for t in adversarial):
        raise RuntimeError(f"attack {attack.name} returned {len(adversarial)} texts for {len(objective.texts)}")
    return adversarial


def _words_changed(clean: list[str], adversarial: list[str]) -> float:
    from .words import changed_words

    return float(max((changed_words(a, b) for a, b in zip(clean, adversarial)), default=0))


@dataclass
class MultimodalProblem:
    """What a multimodal attack sees: clean texts and embeddings, and objective builders.

    ``texts`` are the class prompts (classification) or every caption (retrieval);
    ``text_rows`` maps each caption to the row of its image (retrieval only). Rows index the
    evaluated subset.
    """

    task: str
    victim: Victim
    texts: list[str]
    clean_text_embeddings: torch.Tensor
    clean_image_embeddings: torch.Tensor
    labels: torch.Tensor | None = None
    n_classes: int | None = None
    text_rows: torch.Tensor | None = None

    def image_objective(self, rows: torch.Tensor, text_embeddings: torch.Tensor):
        """The task's image objective for ``rows`` against (possibly adversarial) texts."""
        device = self.victim.device
        if self.task == "classification":
            weights = weights_from_prompt_embeddings(text_embeddings.to(device), self.n_classes)
            return ClassificationObjective(self.victim, weights, self.labels[rows].to(device))
        owner = self.text_rows.to(device)
        return RetrievalObjective(self.victim, text_embeddings.to(device),
                                  owner[None, :] == rows.to(device)[:, None])

    def embedding_shift_objective(self) -> EmbeddingShiftObjective:
        return EmbeddingShiftObjective(self.victim, self.texts, self.clean_text_embeddings)

    def image_guided_objective(self, image_embeddings: torch.Tensor) -> ImageGuidedTextObjective:
        """Each caption against the given embedding of its own image (retrieval only)."""
        if self.text_rows is None:
            raise ValueError("image-guided text objectives need captions paired with images")
        return ImageGuidedTextObjective(self.victim, self.texts,
                                        image_embeddings[self.text_rows].to(self.victim.device))

    def captions_of(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), n_texts] bool: which texts describe each image row (retrieval only)."""
        return self.text_rows[None, :] == rows.cpu()[:, None]


def _run_multimodal(ctx: EvalContext, data: EvalData, indices: list[int], attack: MultimodalAttack,
                    problem: MultimodalProblem, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The three stages; returns adversarial image embeddings, text embeddings, texts."""
    texts = attack.attack_texts(problem, generator)
    if len(texts) != len(problem.texts):
        raise RuntimeError(f"attack {attack.name} returned {len(texts)} texts for {len(problem.texts)}")
    text_embeddings = ctx.victim.encode_texts(texts)
    embeddings, start = [], 0
    for images, _ in image_batches(data, indices, ctx.batch_size, f"{attack.name} {data.name}", ctx.progress):
        rows = torch.arange(start, start + len(images))
        start += len(images)
        images = images.to(ctx.victim.device)
        with torch.enable_grad():
            adversarial = attack.attack_images(problem, rows, images, text_embeddings, generator).detach()
        _check_adversarial(attack, images, adversarial)
        with torch.no_grad():
            embeddings.append(ctx.victim.encode_image(adversarial).cpu())
    image_embeddings = torch.cat(embeddings)
    final = attack.final_texts(problem, texts, image_embeddings, generator)
    if len(final) != len(problem.texts):
        raise RuntimeError(f"attack {attack.name} returned {len(final)} final texts for {len(problem.texts)}")
    return image_embeddings, ctx.victim.encode_texts(final).cpu(), final


def _check_adversarial(attack: Attack, clean: torch.Tensor, adversarial: torch.Tensor) -> None:
    # A plugin bug must not become a leaderboard number.
    if adversarial.shape != clean.shape or not torch.isfinite(adversarial).all():
        raise RuntimeError(f"attack {attack.name} returned images of shape {tuple(adversarial.shape)} "
                           f"or non-finite pixels; expected {tuple(clean.shape)}")
    if adversarial.min() < 0 or adversarial.max() > 1:
        raise RuntimeError(f"attack {attack.name} returned pixels outside [0, 1]")


def _adversarial_embeddings(ctx: EvalContext, data: EvalData, indices: list[int], attack: ImageAttack,
                            make_objective, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of attacked images and per-sample success, batch by batch."""
    victim = ctx.victim
    embeddings, correct = [], []
    desc = f"{attack.name} {data.name}"
    # Random starts keyed by (run seed, dataset, sample index) leave a sample's start
    # independent of its batch and of the attack, so compositions can be compared per sample.
    noise_seed = int(stable_hash({"seed": ctx.seed, "dataset": data.name}, 15), 16)
    for batch, (images, targets) in enumerate(image_batches(data, indices, ctx.batch_size, desc, ctx.progress)):
        images, targets = images.to(victim.device), targets.to(victim.device)
        objective = make_objective(images, targets)
        start = batch * ctx.batch_size
        objective.noise = SampleNoise(noise_seed, indices[start:start + len(images)])
        if batch == 0:
            _probe_determinism(attack, victim, images, objective, generator)
        with torch.enable_grad():
            adversarial = attack.perturb_images(victim, images, objective, generator).detach()
        _check_adversarial(attack, images, adversarial)
        with torch.no_grad():
            embeddings.append(victim.encode_image(adversarial).cpu())
            correct.append(objective.correct(adversarial).cpu())
    return torch.cat(embeddings), torch.cat(correct)


def _probe_determinism(attack: ImageAttack, victim: Victim, images: torch.Tensor, objective,
                       generator: torch.Generator, size: int = 4) -> None:
    """Run the attack twice on a few samples from the same generator state; differing outputs
    mean results cannot be reproduced (AutoAttack's randomness check)."""
    rows = torch.arange(min(size, len(images)), device=images.device)
    state = generator.get_state()
    outputs = []
    with torch.enable_grad():
        for _ in range(2):
            probe = torch.Generator().set_state(state)
            outputs.append(attack.perturb_images(victim, images[rows], objective.subset(rows), probe).detach())
    if not torch.equal(*outputs):
        attack.note("non-deterministic outputs: the same inputs and seed gave different adversarial images")


def _unsupported(attack: Attack, task: str) -> UserError:
    return UserError(f"attack {attack.name} has modality {attack.modality!r}, which the {task} task "
                     "cannot run", "use an image, text or multimodal attack")


def evaluate_classification(ctx: EvalContext, data: EvalData, indices: list[int], attack: Attack,
                            generator: torch.Generator) -> dict[str, float]:
    weights = cached_classifier(ctx, data).to(ctx.victim.device)
    clean = clean_image_embeddings(ctx, data, indices)
    labels = _labels(data, indices)
    clean_correct = ((clean.to(weights.device) @ weights.T).argmax(dim=1).cpu() == labels)
    metrics = {"clean_top1": 100.0 * clean_correct.float().mean().item()}
    if isinstance(attack, NoAttack):
        metrics["top1"] = metrics["clean_top1"]
    elif isinstance(attack, ImageAttack):
        _, correct = _adversarial_embeddings(
            ctx, data, indices, attack,
            lambda images, targets: ClassificationObjective(ctx.victim, weights, targets), generator)
        metrics["top1"] = 100.0 * correct.float().mean().item()
    elif isinstance(attack, TextAttack):
        prompts = class_prompts(data.classnames, data.templates)
        objective = EmbeddingShiftObjective(ctx.victim, prompts, ctx.victim.encode_texts(prompts))
        adversarial = _attack_texts(attack, ctx, objective, generator)
        attacked = weights_from_prompt_embeddings(ctx.victim.encode_texts(adversarial), len(data.classnames))
        correct = (clean.to(attacked.device) @ attacked.T).argmax(dim=1).cpu() == labels
        metrics["top1"] = 100.0 * correct.float().mean().item()
        metrics["max_words_changed"] = _words_changed(prompts, adversarial)
    elif isinstance(attack, MultimodalAttack):
        prompts = class_prompts(data.classnames, data.templates)
        problem = MultimodalProblem("classification", ctx.victim, prompts, ctx.victim.encode_texts(prompts),
                                    clean, labels=labels, n_classes=len(data.classnames))
        images, texts, adversarial = _run_multimodal(ctx, data, indices, attack, problem, generator)
        attacked = weights_from_prompt_embeddings(texts, len(data.classnames))
        metrics["top1"] = 100.0 * ((images @ attacked.T).argmax(dim=1) == labels).float().mean().item()
        metrics["max_words_changed"] = _words_changed(prompts, adversarial)
    else:
        raise _unsupported(attack, "classification")
    return metrics


def _labels(data: EvalData, indices: list[int]) -> torch.Tensor:
    targets = getattr(data.images, "targets", None)
    if targets is not None:
        return torch.as_tensor([int(targets[i]) for i in indices])
    return torch.as_tensor([int(data.images[i][1]) for i in indices])


def retrieval_hits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                   text_to_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, torch.Tensor]:
    """Per query, is it retrieved within the top K? ``{"i2t_R@K": [images], "t2i_R@K": [texts]}``."""
    similarity = image_embeddings @ text_embeddings.T  # [images, texts]
    n_images, n_texts = similarity.shape
    top = max(ks)
    image_ranked = similarity.topk(min(top, n_texts), dim=1).indices          # [images, k]
    text_ranked = similarity.T.topk(min(top, n_images), dim=1).indices        # [texts, k]
    image_hits = text_to_image[image_ranked] == torch.arange(n_images)[:, None]
    text_hits = text_ranked == text_to_image[:, None]
    hits = {}
    for k in ks:
        hits[f"i2t_R@{k}"] = image_hits[:, :k].any(dim=1)
        hits[f"t2i_R@{k}"] = text_hits[:, :k].any(dim=1)
    return hits


def recall_at_k(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                text_to_image: torch.Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Image→text and text→image Recall@K in percent (several captions per image)."""
    hits = retrieval_hits(image_embeddings, text_embeddings, text_to_image, ks)
    return {name: 100.0 * hit.float().mean().item() for name, hit in hits.items()}


def attack_success_rates(clean: dict[str, torch.Tensor], attacked: dict[str, torch.Tensor]) -> dict[str, float]:
    """Both success-rate definitions of the retrieval attack literature, named apart:

    - ``asr_drop_<R@K>`` (Co-Attack): clean R@K minus attacked R@K, in points;
    - ``asr_relative_<R@K>`` (SGA's ``itm_eval``): the share of queries correct before the
      attack that are wrong after it, |C_clean \\ C_adv| / |C_clean| × 100, ignoring queries the
      attack makes correct.
    """
    rates = {}
    for name, before in clean.items():
        after = attacked[name]
        rates[f"asr_drop_{name}"] = 100.0 * (before.float().mean() - after.float().mean()).item()
        rates[f"asr_relative_{name}"] = 100.0 * (before & ~after).sum().item() / max(1, int(before.sum()))
    return rates


def evaluate_retrieval(ctx: EvalContext, data: EvalData, indices: list[int], attack: Attack,
                       generator: torch.Generator) -> dict[str, float]:
    texts = [caption for i in indices for caption in data.captions[i]]
    text_to_image = torch.as_tensor([row for row, i in enumerate(indices) for _ in data.captions[i]])
    key = {"kind": "caption-embeddings", **_data_key(ctx, data, indices)}
    text_embeddings = ctx.cache.get_or_compute(key, lambda: ctx.victim.encode_texts(texts).cpu())
    clean = clean_image_embeddings(ctx, data, indices)
    clean_hits = retrieval_hits(clean, text_embeddings, text_to_image)
    metrics = {f"clean_{name}": 100.0 * hit.float().mean().item() for name, hit in clean_hits.items()}
    extra: dict[str, float] = {}
    if isinstance(attack, NoAttack):
        images, attacked_texts = clean, text_embeddings
    elif isinstance(attack, ImageAttack):
        gallery = text_embeddings.to(ctx.victim.device)
        row_of = {image: row for row, image in enumerate(indices)}
        owner = text_to_image.to(ctx.victim.device)

        def objective(images: torch.Tensor, targets: torch.Tensor) -> RetrievalObjective:
            rows = torch.as_tensor([row_of[int(t)] for t in targets], device=owner.device)
            return RetrievalObjective(ctx.victim, gallery, owner[None, :] == rows[:, None])

        images, _ = _adversarial_embeddings(ctx, data, indices, attack, objective, generator)
        attacked_texts = text_embeddings
    elif isinstance(attack, TextAttack):
        objective = ImageGuidedTextObjective(ctx.victim, texts, clean[text_to_image].to(ctx.victim.device))
        adversarial = _attack_texts(attack, ctx, objective, generator)
        images, attacked_texts = clean, ctx.victim.encode_texts(adversarial).cpu()
        extra["max_words_changed"] = _words_changed(texts, adversarial)
    elif isinstance(attack, MultimodalAttack):
        problem = MultimodalProblem("retrieval", ctx.victim, texts, text_embeddings.to(ctx.victim.device),
                                    clean, text_rows=text_to_image)
        images, attacked_texts, adversarial = _run_multimodal(ctx, data, indices, attack, problem, generator)
        extra["max_words_changed"] = _words_changed(texts, adversarial)
    else:
        raise _unsupported(attack, "retrieval")
    hits = retrieval_hits(images, attacked_texts, text_to_image)
    metrics.update({name: 100.0 * hit.float().mean().item() for name, hit in hits.items()})
    if not isinstance(attack, NoAttack):
        metrics.update(attack_success_rates(clean_hits, hits))
    return {**metrics, **extra}


EVALUATORS = {"classification": evaluate_classification, "retrieval": evaluate_retrieval}

#: the headline metrics of each task, in leaderboard order
PRIMARY_METRICS = {"classification": ("top1",), "retrieval": ("i2t_R@1", "t2i_R@1")}


def evaluate(ctx: EvalContext, data: EvalData, indices: list[int], attack: Attack,
             generator: torch.Generator) -> dict[str, float]:
    return EVALUATORS[data.task](ctx, data, indices, attack, generator)
