"""What attacks maximise, supplied by the tasks: cross-entropy over zero-shot logits
(classification) and the image→text InfoNCE loss with every caption of an image as a
positive (retrieval) for image attacks; Co-Attack's embedding-shift KL and SGA's image-guided
cosine for text attacks; and :class:`MultimodalProblem`, what a multimodal attack sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from vlbench.api import ImageAttack, TextAttack
from vlbench.evaluation.context import EvalMemo, TextEmbeddings, weights_from_prompt_embeddings
from vlbench.evaluation.perturb import SampleNoise
from vlbench.evaluation.running import perturb_images, perturb_texts
from vlbench.models.victim import Victim
from vlbench.store.files import stable_hash, tensor_fingerprint


def _noise_subset(noise: SampleNoise | None, rows: torch.Tensor) -> SampleNoise | None:
    return None if noise is None else noise.subset(rows)


class ClassificationObjective:
    """Cross-entropy of ``logit_scale * cos(image, class)`` against the true class.

    ``rows`` (optional) says which samples of the batch ``images`` holds, for attacks that
    work on a shrinking set of still-correct samples; ``noise`` keys random starts by sample.
    """

    def __init__(self, victim: Victim, weights: torch.Tensor, labels: torch.Tensor,
                 noise: SampleNoise | None = None, attack_only_correct: bool = False,
                 weights_for: Callable[[Victim], torch.Tensor] | None = None):
        self.victim, self.weights, self.labels, self.noise = victim, weights, labels, noise
        #: image attacks may leave the samples :meth:`correct` already rejects unattacked:
        #: they count as errors whatever the attack does (AutoAttack's rule)
        self.attack_only_correct = attack_only_correct
        #: another model's class weights for the same prompts (see :meth:`on`)
        self.weights_for = weights_for

    def on(self, victim: Victim) -> "ClassificationObjective":
        """The same problem posed to ``victim`` (a transfer attack's surrogate): its own class
        weights for the same prompts, the same labels and noise, every sample attacked."""
        if self.weights_for is None:
            raise ValueError("this objective was built without a way to pose it to another model")
        return ClassificationObjective(victim, self.weights_for(victim), self.labels, self.noise,
                                       weights_for=self.weights_for)

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.logit_scale * self.victim.encode_image(images) @ self.weights.T

    def subset(self, rows: torch.Tensor) -> "ClassificationObjective":
        return ClassificationObjective(self.victim, self.weights, self.labels[rows], _noise_subset(self.noise, rows),
                                       self.attack_only_correct, self.weights_for)

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
                 noise: SampleNoise | None = None, texts_for: Callable[[Victim], torch.Tensor] | None = None):
        self.victim, self.texts, self.positives, self.noise = victim, text_embeddings, positives, noise
        #: another model's embeddings of the same gallery captions (see :meth:`on`)
        self.texts_for = texts_for

    def on(self, victim: Victim) -> "RetrievalObjective":
        """The same problem posed to ``victim`` (a transfer attack's surrogate): its own
        embeddings of the same captions, the same positives and noise."""
        if self.texts_for is None:
            raise ValueError("this objective was built without a way to pose it to another model")
        return RetrievalObjective(victim, self.texts_for(victim), self.positives, self.noise, self.texts_for)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.logit_scale * self.victim.encode_image(images) @ self.texts.T

    def subset(self, rows: torch.Tensor) -> "RetrievalObjective":
        return RetrievalObjective(self.victim, self.texts, self.positives[rows], _noise_subset(self.noise, rows),
                                  self.texts_for)

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


class EmbeddingShiftObjective:
    """Untargeted, image-free text objective of Co-Attack's ``BertAttack`` (the one MMCoA
    uses on class prompts): KL(softmax(g(t)) ‖ softmax(g(t'))) over embedding dimensions of
    the normalised clean and candidate text embeddings."""

    def __init__(self, victim: Victim, texts: list[str], clean_embeddings: torch.Tensor,
                 embed: TextEmbeddings | None = None, meaning: Callable[[str], object] | None = None):
        self.victim, self.texts, self.meaning = victim, texts, meaning
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
        return _objective_identity(self, {"guide": self.clean_log_probs}, texts=self.texts, **_meaning_key(self))


def _meaning_key(objective) -> dict:
    """The text objective's meaning parser, by name, for its identity (none: nothing)."""
    meaning = getattr(objective, "meaning", None)
    return {} if meaning is None else {"meaning": f"{meaning.__module__}.{meaning.__qualname__}"}


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
                 embed: TextEmbeddings | None = None, meaning: Callable[[str], object] | None = None):
        self.victim, self.texts, self.images, self.meaning = victim, texts, paired_image_embeddings, meaning
        self.embed = embed or TextEmbeddings(victim)

    def score_many(self, candidates: list[str], rows: list[int]) -> torch.Tensor:
        images = self.images[torch.as_tensor(rows, device=self.images.device)]
        return -(self.embed(candidates).to(images.device) * images).sum(dim=-1)

    def score(self, candidates: list[str], row: int) -> torch.Tensor:
        return self.score_many(candidates, [row] * len(candidates))

    def identity(self) -> str:
        return _objective_identity(self, {"guide": self.images}, texts=self.texts, **_meaning_key(self))


@dataclass
class MultimodalProblem:
    """What a multimodal attack sees: clean texts and embeddings, and objective builders.

    ``texts`` are the class prompts (classification) or every caption (retrieval);
    ``text_rows`` maps each caption to the row of its image (retrieval only). Rows index the
    evaluated subset; ``noise`` keys random starts by sample, for the whole subset. ``memo``
    is what the victim's cells share (stages equal to another cell's attack are computed once).
    ``meaning`` is the dataset's text parser, passed to the text objectives it builds
    (:class:`vlbench.api.TextObjective`). The counts its stages' attacks make
    (:meth:`vlbench.api.Attack.count`) are collected for the multimodal attack's cell.
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
    meaning: Callable[[str], object] | None = None
    stage_counts: dict = field(default_factory=dict)

    def _collect(self, attack) -> None:
        for name, n in attack.take_counts().items():
            self.stage_counts[name] = self.stage_counts.get(name, 0) + n

    def perturb_texts(self, attack: TextAttack, objective, generator: torch.Generator) -> list[str]:
        """A text stage: ``attack`` on ``objective`` (see :func:`perturb_texts`)."""
        texts = perturb_texts(attack, self.victim, objective, generator, self.memo)
        self._collect(attack)
        return texts

    def perturb_images(self, attack: ImageAttack, images: torch.Tensor, objective,
                       generator: torch.Generator) -> torch.Tensor:
        """An image stage: ``attack`` on ``images`` under ``objective`` (see :func:`perturb_images`)."""
        images = perturb_images(attack, self.victim, images, objective, generator, self.memo)
        self._collect(attack)
        return images

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
        return EmbeddingShiftObjective(self.victim, self.texts, self.clean_text_embeddings, self._embed(),
                                       self.meaning)

    def image_guided_objective(self, image_embeddings: torch.Tensor) -> ImageGuidedTextObjective:
        """Each caption against the given embedding of its own image (retrieval only)."""
        if self.text_rows is None:
            raise ValueError("image-guided text objectives need captions paired with images")
        return ImageGuidedTextObjective(self.victim, self.texts,
                                        image_embeddings[self.text_rows].to(self.victim.device), self._embed(),
                                        self.meaning)

    def captions_of(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), n_texts] bool: which texts describe each image row (retrieval only)."""
        return self.text_rows[None, :] == rows.cpu()[:, None]
