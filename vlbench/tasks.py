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

from .api import Attack, ImageAttack, MultimodalAttack, NoAttack, TextAttack
from .cache import EmbeddingCache
from .datasets import EvalData, subset_hash
from .errors import UserError
from .io import stable_hash, tensor_fingerprint
from .model import Victim
from .perturb import SampleNoise
from .progress import progress as progress_bar

RECALL_KS = (1, 5, 10)


@dataclass
class EvalContext:
    victim: Victim
    cache: EmbeddingCache
    batch_size: int = 256
    progress: bool = True
    seed: int = 0
    #: what the cells of this victim share (see :class:`EvalMemo`)
    memo: "EvalMemo | None" = None

    def __post_init__(self):
        if self.memo is None:
            self.memo = EvalMemo(self.victim)


def image_batches(data: EvalData, indices: list[int], batch_size: int,
                  desc: str | None = None, progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked ``(images, targets)`` batches of ``data`` restricted to ``indices``."""
    starts = range(0, len(indices), batch_size)
    for start in progress_bar(starts, desc=desc, leave=False, enabled=progress):
        items = [data.images[i] for i in indices[start:start + batch_size]]
        images = torch.stack([item[0] for item in items])
        targets = torch.as_tensor([int(item[1]) for item in items])
        yield images, targets


def _data_key(ctx: EvalContext, data: EvalData, indices: list[int]) -> dict[str, Any]:
    return {"model": ctx.victim.fingerprint(), "precision": ctx.victim.precision,
            "dataset": data.name, "split": data.spec.split,
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


def _noise_subset(noise: SampleNoise | None, rows: torch.Tensor) -> SampleNoise | None:
    return None if noise is None else noise.subset(rows)


class ClassificationObjective:
    """Cross-entropy of ``logit_scale * cos(image, class)`` against the true class.

    ``rows`` (optional) says which samples of the batch ``images`` holds, for attacks that
    work on a shrinking set of still-correct samples; ``noise`` keys random starts by sample.
    """

    def __init__(self, victim: Victim, weights: torch.Tensor, labels: torch.Tensor,
                 noise: SampleNoise | None = None, attack_only_correct: bool = False):
        self.victim, self.weights, self.labels, self.noise = victim, weights, labels, noise
        #: image attacks may leave the samples :meth:`correct` already rejects unattacked:
        #: they count as errors whatever the attack does (AutoAttack's rule)
        self.attack_only_correct = attack_only_correct

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.logit_scale * self.victim.encode_image(images) @ self.weights.T

    def subset(self, rows: torch.Tensor) -> "ClassificationObjective":
        return ClassificationObjective(self.victim, self.weights, self.labels[rows], _noise_subset(self.noise, rows),
                                       self.attack_only_correct)

    def identity(self) -> str:
        return _objective_identity(self, {"weights": self.weights, "labels": self.labels},
                                   attack_only_correct=self.attack_only_correct)

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

    def identity(self) -> str:
        return _objective_identity(self, {"texts": self.texts, "positives": self.positives})

    def _positives(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.positives if rows is None else self.positives[rows]

    def loss(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(images)
        positive = logits.masked_fill(~self._positives(rows), float("-inf"))
        return torch.logsumexp(logits, dim=1) - torch.logsumexp(positive, dim=1)

    def correct(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        top = self.logits(images).argmax(dim=1)
        return self._positives(rows)[torch.arange(len(top)), top]


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


class EmbeddingShiftObjective:
    """Untargeted, image-free text objective of Co-Attack's ``BertAttack`` (the one MMCoA
    uses on class prompts): KL(softmax(g(t)) ‖ softmax(g(t'))) over embedding dimensions of
    the normalised clean and candidate text embeddings."""

    def __init__(self, victim: Victim, texts: list[str], clean_embeddings: torch.Tensor,
                 embed: TextEmbeddings | None = None):
        self.victim, self.texts = victim, texts
        self.clean_log_probs = F.log_softmax(clean_embeddings, dim=-1)
        self.embed = embed or TextEmbeddings(victim)

    def score_many(self, candidates: list[str], rows: list[int]) -> torch.Tensor:
        log_q = F.log_softmax(self.embed(candidates).to(self.clean_log_probs.device), dim=-1)
        log_p = self.clean_log_probs[torch.as_tensor(rows, device=log_q.device)]
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        return self.score_many(candidates, [row] * len(candidates))

    def identity(self) -> str:
        """What the objective's value depends on: victim, texts and clean embeddings."""
        return _objective_identity(self, {"guide": self.clean_log_probs}, texts=self.texts)


def _objective_identity(objective, tensors: dict[str, torch.Tensor], **extra) -> str:
    """A hash of what an objective's values depend on: its kind, the victim and precision,
    its tensors and anything else it names."""
    victim = objective.victim
    noise = getattr(objective, "noise", None)
    return stable_hash({"kind": type(objective).__name__, "model": victim.fingerprint(),
                        "precision": victim.precision, "tensors": tensor_fingerprint(tensors),
                        "noise": None if noise is None else [noise.seed, noise.keys.tolist()], **extra}, 32)


class ImageGuidedTextObjective:
    """SGA's image-guided text objective: the negative cosine between the candidate caption
    and the embedding of the image it describes (Lu et al., ICCV 2023, §3.3)."""

    def __init__(self, victim: Victim, texts: list[str], paired_image_embeddings: torch.Tensor,
                 embed: TextEmbeddings | None = None):
        self.victim, self.texts, self.images = victim, texts, paired_image_embeddings
        self.embed = embed or TextEmbeddings(victim)

    def score_many(self, candidates: list[str], rows: list[int]) -> torch.Tensor:
        images = self.images[torch.as_tensor(rows, device=self.images.device)]
        return -(self.embed(candidates).to(images.device) * images).sum(dim=-1)

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        return self.score_many(candidates, [row] * len(candidates))

    def identity(self) -> str:
        return _objective_identity(self, {"guide": self.images}, texts=self.texts)


def perturb_texts(attack: TextAttack, victim: Victim, objective, generator: torch.Generator,
                  memo: EvalMemo | None = None) -> list[str]:
    """Run a text attack and check its output; with ``memo``, a deterministic attack run
    before on the same objective returns its earlier texts."""
    def compute() -> list[str]:
        adversarial = attack.perturb_texts(victim, objective, generator)
        if len(adversarial) != len(objective.texts) or not all(isinstance(t, str) for t in adversarial):
            raise RuntimeError(f"attack {attack.name} returned {len(adversarial)} texts for {len(objective.texts)}")
        return list(adversarial)

    return list(memo.attack(attack, objective, "", compute) if memo is not None else compute())


def perturb_images(attack: ImageAttack, victim: Victim, images: torch.Tensor, objective,
                   generator: torch.Generator, memo: EvalMemo | None = None) -> torch.Tensor:
    """Run an image attack and check its output; with ``memo``, a deterministic attack run
    before on the same images and objective (per-sample noise included) returns its earlier
    images."""
    def compute() -> torch.Tensor:
        with torch.enable_grad():
            adversarial = attack.perturb_images(victim, images, objective, generator).detach()
        _check_adversarial(attack, images, adversarial)
        return adversarial

    if memo is None or getattr(objective, "noise", None) is None:
        return compute()

    def compute_and_record():
        # the notes and adjustments this computation makes are part of its result: a cell
        # that reuses it records them as its own
        earlier = attack.take_notes(), attack.take_adjustments()
        adversarial = compute()
        made = attack.take_notes(), attack.take_adjustments()
        _record(attack, *earlier)
        return adversarial, made

    adversarial, made = memo.attack(attack, objective, tensor_fingerprint({"images": images}), compute_and_record)
    _record(attack, *made)
    return adversarial


def _record(attack: Attack, notes: list[str], adjustments: list[str]) -> None:
    for message in notes:
        attack.note(message)
    for message in adjustments:
        attack.adjust(message)


def _attack_texts(attack: TextAttack, ctx: EvalContext, objective, generator) -> list[str]:
    return perturb_texts(attack, ctx.victim, objective, generator, ctx.memo)


def _words_changed(clean: list[str], adversarial: list[str]) -> float:
    from .words import changed_words

    return float(max((changed_words(a, b) for a, b in zip(clean, adversarial)), default=0))


@dataclass
class MultimodalProblem:
    """What a multimodal attack sees: clean texts and embeddings, and objective builders.

    ``texts`` are the class prompts (classification) or every caption (retrieval);
    ``text_rows`` maps each caption to the row of its image (retrieval only). Rows index the
    evaluated subset; ``noise`` keys random starts by sample, for the whole subset. ``memo``
    is what the victim's cells share (stages equal to another cell's attack are computed once).
    """

    task: str
    victim: Victim
    texts: list[str]
    clean_text_embeddings: torch.Tensor
    clean_image_embeddings: torch.Tensor
    labels: torch.Tensor | None = None
    n_classes: int | None = None
    text_rows: torch.Tensor | None = None
    noise: SampleNoise | None = None
    memo: EvalMemo | None = None

    def perturb_texts(self, attack: TextAttack, objective, generator: torch.Generator) -> list[str]:
        """A text stage: ``attack`` on ``objective`` (see :func:`perturb_texts`)."""
        return perturb_texts(attack, self.victim, objective, generator, self.memo)

    def perturb_images(self, attack: ImageAttack, images: torch.Tensor, objective,
                       generator: torch.Generator) -> torch.Tensor:
        """An image stage: ``attack`` on ``images`` under ``objective`` (see :func:`perturb_images`)."""
        return perturb_images(attack, self.victim, images, objective, generator, self.memo)

    def image_objective(self, rows: torch.Tensor, text_embeddings: torch.Tensor):
        """The task's image objective for ``rows`` against (possibly adversarial) texts.

        Classification: attacks may leave images the model already misclassifies against
        these texts unattacked, as the ``pgd`` cells do, so that a stage against the clean
        prompts is the ``pgd`` cell's attack."""
        device = self.victim.device
        noise = _noise_subset(self.noise, rows)
        if self.task == "classification":
            weights = weights_from_prompt_embeddings(text_embeddings.to(device), self.n_classes)
            return ClassificationObjective(self.victim, weights, self.labels[rows].to(device), noise,
                                           attack_only_correct=True)
        owner = self.text_rows.to(device)
        return RetrievalObjective(self.victim, text_embeddings.to(device),
                                  owner[None, :] == rows.to(device)[:, None], noise)

    def _embed(self) -> TextEmbeddings | None:
        return self.memo.embed if self.memo is not None else None

    def embedding_shift_objective(self) -> EmbeddingShiftObjective:
        return EmbeddingShiftObjective(self.victim, self.texts, self.clean_text_embeddings, self._embed())

    def image_guided_objective(self, image_embeddings: torch.Tensor) -> ImageGuidedTextObjective:
        """Each caption against the given embedding of its own image (retrieval only)."""
        if self.text_rows is None:
            raise ValueError("image-guided text objectives need captions paired with images")
        return ImageGuidedTextObjective(self.victim, self.texts,
                                        image_embeddings[self.text_rows].to(self.victim.device), self._embed())

    def captions_of(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), n_texts] bool: which texts describe each image row (retrieval only)."""
        return self.text_rows[None, :] == rows.cpu()[:, None]


def _noise(ctx: EvalContext, data: EvalData, indices: list[int]) -> SampleNoise:
    """Random starts keyed by (run seed, dataset, sample index): a sample's start does not
    depend on its batch or on the attack, so compositions can be compared per sample and
    attacks that are the same computation give the same images."""
    return SampleNoise(int(stable_hash({"seed": ctx.seed, "dataset": data.name}, 15), 16), indices)


def _run_multimodal(ctx: EvalContext, data: EvalData, indices: list[int], attack: MultimodalAttack,
                    problem: MultimodalProblem, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The three stages; returns adversarial image embeddings, text embeddings, texts."""
    texts = attack.attack_texts(problem, generator)
    if len(texts) != len(problem.texts):
        raise RuntimeError(f"attack {attack.name} returned {len(texts)} texts for {len(problem.texts)}")
    text_embeddings = ctx.memo.embed(texts)
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
    return image_embeddings, ctx.memo.embed(final).cpu(), final


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
    noise = _noise(ctx, data, indices)
    desc = f"{attack.name} {data.name}"
    for batch, (images, targets) in enumerate(image_batches(data, indices, ctx.batch_size, desc, ctx.progress)):
        images, targets = images.to(victim.device), targets.to(victim.device)
        objective = make_objective(images, targets)
        start = batch * ctx.batch_size
        objective.noise = noise.subset(torch.arange(start, start + len(images)))
        if batch == 0:
            _probe_determinism(attack, victim, images, objective, generator)
        adversarial = perturb_images(attack, victim, images, objective, generator, ctx.memo)
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
    prompts = class_prompts(data.classnames, data.templates)
    prompt_embeddings = cached_prompt_embeddings(ctx, data).to(ctx.victim.device)
    weights = weights_from_prompt_embeddings(prompt_embeddings, len(data.classnames))
    clean = clean_image_embeddings(ctx, data, indices)
    labels = _labels(data, indices)
    clean_correct = ((clean.to(weights.device) @ weights.T).argmax(dim=1).cpu() == labels)
    metrics = {"clean_top1": 100.0 * clean_correct.float().mean().item()}
    if isinstance(attack, NoAttack):
        metrics["top1"] = metrics["clean_top1"]
    elif isinstance(attack, ImageAttack):
        _, correct = _adversarial_embeddings(
            ctx, data, indices, attack,
            lambda images, targets: ClassificationObjective(ctx.victim, weights, targets, attack_only_correct=True),
            generator)
        metrics["top1"] = 100.0 * correct.float().mean().item()
    elif isinstance(attack, TextAttack):
        objective = EmbeddingShiftObjective(ctx.victim, prompts, prompt_embeddings, ctx.memo.embed)
        adversarial = _attack_texts(attack, ctx, objective, generator)
        attacked = weights_from_prompt_embeddings(ctx.memo.embed(adversarial), len(data.classnames))
        correct = (clean.to(attacked.device) @ attacked.T).argmax(dim=1).cpu() == labels
        metrics["top1"] = 100.0 * correct.float().mean().item()
        metrics["max_words_changed"] = _words_changed(prompts, adversarial)
    elif isinstance(attack, MultimodalAttack):
        problem = MultimodalProblem("classification", ctx.victim, prompts, prompt_embeddings,
                                    clean, labels=labels, n_classes=len(data.classnames),
                                    noise=_noise(ctx, data, indices), memo=ctx.memo)
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
    ctx.memo.embed.seed(texts, text_embeddings)
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
        objective = ImageGuidedTextObjective(ctx.victim, texts, clean[text_to_image].to(ctx.victim.device),
                                             ctx.memo.embed)
        adversarial = _attack_texts(attack, ctx, objective, generator)
        images, attacked_texts = clean, ctx.memo.embed(adversarial).cpu()
        extra["max_words_changed"] = _words_changed(texts, adversarial)
    elif isinstance(attack, MultimodalAttack):
        problem = MultimodalProblem("retrieval", ctx.victim, texts, text_embeddings.to(ctx.victim.device),
                                    clean, text_rows=text_to_image, noise=_noise(ctx, data, indices), memo=ctx.memo)
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
