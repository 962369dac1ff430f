"""Evaluation tasks, registered classes: zero-shot classification and image-text retrieval,
clean and attacked.

A task is built once per cell from the victim's context, the dataset and the evaluated
subset: it computes what every attack on it starts from (clean embeddings, class weights or
caption embeddings, the clean metrics), then runs the cell's attack through the handler of
its declared modality (``none``, ``image``, ``text``, ``multimodal``). Classification
reports top-1 accuracy of ``logit_scale * cos(image, class)`` (CLIP, Radford et al. 2021,
§3.1.4, as TeCoA and CLIP_benchmark run it); retrieval reports Recall@{1,5,10} both ways and
the attack success rates (:mod:`vlbench.evaluation.metrics`). A new task family is a
subclass registered in :data:`tasks`, with the task name its datasets carry in the card.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vlbench.api import Attack
from vlbench.data.datasets import EvalData
from vlbench.errors import UserError
from vlbench.evaluation.context import (EvalContext, cached_prompt_embeddings, class_prompts, clean_image_embeddings,
                                        data_key, sample_noise, weights_from_prompt_embeddings)
from vlbench.evaluation.metrics import attack_success_rates, first_positive_ranks, hits_from_ranks, words_changed
from vlbench.evaluation.objectives import (ClassificationObjective, EmbeddingShiftObjective, ImageGuidedTextObjective,
                                           MultimodalProblem, RetrievalObjective)
from vlbench.evaluation.running import adversarial_embeddings, attack_texts, run_multimodal
from vlbench.registry import Registry


class Task:
    """One task family; an instance evaluates one cell's subset of a dataset."""

    #: the headline metrics, in leaderboard order
    primary_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: EvalContext, data: EvalData, indices: list[int]):
        self.ctx, self.data, self.indices = ctx, data, indices
        #: each sample's outcome under the evaluated attack, for intervals and paired tests
        #: (:mod:`vlbench.reporting.statistics`); filled as a handler computes its metrics
        self.samples: dict = {"ids": list(indices)}

    @staticmethod
    def sizes(data: EvalData, indices: list[int]) -> tuple[int, int]:
        """``(texts, classes)`` a cell on ``indices`` works with, for the run's time estimate."""
        raise NotImplementedError

    def evaluate(self, attack: Attack, generator: torch.Generator) -> dict[str, float]:
        """The handler's metrics, with the counts the attack made (:meth:`Attack.count`)."""
        handler = getattr(self, f"under_{attack.modality}", None)
        if handler is None:
            raise UserError(f"attack {attack.name} has modality {attack.modality!r}, which the "
                            f"{self.data.task} task cannot run", "use an image, text or multimodal attack")
        attack.take_counts()  # none left from an earlier, failed evaluation
        metrics = handler(attack, generator)
        for name, n in attack.take_counts().items():
            if name in metrics:
                raise RuntimeError(f"attack {attack.name} counts {name!r}, a metric of the {self.data.task} task")
            metrics[name] = n
        return metrics

    @property
    def meaning(self):
        """The dataset's text parser for attacks that keep the meaning (None: it has none)."""
        return getattr(self.data, "meaning", None)


tasks: Registry[type[Task]] = Registry("task", base=Task)


def _labels(data: EvalData, indices: list[int]) -> torch.Tensor:
    targets = getattr(data.images, "targets", None)
    if targets is not None:
        return torch.as_tensor([int(targets[i]) for i in indices])
    return torch.as_tensor([int(data.images[i][1]) for i in indices])


def _on(task: Task, victim, compute) -> torch.Tensor:
    """``compute()`` for ``victim``, once per task and model."""
    made = task.__dict__.setdefault("_surrogates", {})
    if victim.fingerprint() not in made:
        made[victim.fingerprint()] = compute()
    return made[victim.fingerprint()]


def _top1(correct: torch.Tensor) -> float:
    return 100.0 * correct.float().mean().item()


def _bits(correct: torch.Tensor) -> str:
    """Per-sample correctness as a string of 0s and 1s, in the order of the subset's ids."""
    return "".join("1" if c else "0" for c in correct.tolist())


@tasks.register("classification")
class ClassificationTask(Task):
    """Zero-shot classification: images against class-prompt embeddings."""

    primary_metrics = ("top1",)

    def __init__(self, ctx: EvalContext, data: EvalData, indices: list[int]):
        super().__init__(ctx, data, indices)
        self.prompts = class_prompts(data.classnames, data.templates)
        self.prompt_embeddings = cached_prompt_embeddings(ctx, data).to(ctx.victim.device)
        self.weights = weights_from_prompt_embeddings(self.prompt_embeddings, len(data.classnames))
        self.clean = clean_image_embeddings(ctx, data, indices)
        self.labels = _labels(data, indices)
        self.clean_correct = (self.clean.to(self.weights.device) @ self.weights.T).argmax(dim=1).cpu() == self.labels
        self.clean_top1 = _top1(self.clean_correct)

    @staticmethod
    def sizes(data: EvalData, indices: list[int]) -> tuple[int, int]:
        return len(data.classnames) * len(data.templates), len(data.classnames)

    def _weights_on(self, victim) -> torch.Tensor:
        """Another model's zero-shot class weights (a transfer attack's surrogate)."""
        return _on(self, victim, lambda: weights_from_prompt_embeddings(
            victim.encode_texts(self.prompts).to(victim.device), len(self.data.classnames)))

    def _metrics(self, correct: torch.Tensor, **extra: float) -> dict[str, float]:
        correct = correct.cpu()
        self.samples.update(clean_top1=_bits(self.clean_correct), top1=_bits(correct))
        return {"clean_top1": self.clean_top1, "top1": _top1(correct), **extra}

    def under_none(self, attack, generator) -> dict[str, float]:
        return self._metrics(self.clean_correct)

    def under_image(self, attack, generator) -> dict[str, float]:
        ctx = self.ctx
        _, correct = adversarial_embeddings(
            ctx, self.data, self.indices, attack,
            lambda images, targets: ClassificationObjective(ctx.victim, self.weights, targets, attack_only_correct=True,
                                                            weights_for=self._weights_on),
            generator)
        return self._metrics(correct)

    def under_text(self, attack, generator) -> dict[str, float]:
        ctx = self.ctx
        objective = EmbeddingShiftObjective(ctx.victim, self.prompts, self.prompt_embeddings, ctx.memo.embed,
                                            self.meaning)
        adversarial = attack_texts(attack, ctx, objective, generator)
        attacked = weights_from_prompt_embeddings(ctx.memo.embed(adversarial), len(self.data.classnames))
        correct = (self.clean.to(attacked.device) @ attacked.T).argmax(dim=1).cpu() == self.labels
        return self._metrics(correct, max_words_changed=words_changed(self.prompts, adversarial))

    def under_multimodal(self, attack, generator) -> dict[str, float]:
        ctx, data = self.ctx, self.data
        problem = MultimodalProblem("classification", ctx.victim, self.prompts, self.prompt_embeddings,
                                    self.clean, labels=self.labels, n_classes=len(data.classnames),
                                    noise=sample_noise(ctx, data, self.indices), memo=ctx.memo,
                                    meaning=self.meaning)
        images, texts, adversarial = run_multimodal(ctx, data, self.indices, attack, problem, generator)
        attacked = weights_from_prompt_embeddings(texts, len(data.classnames))
        return self._metrics((images @ attacked.T).argmax(dim=1).cpu() == self.labels,
                             max_words_changed=words_changed(self.prompts, adversarial))


@tasks.register("retrieval")
class RetrievalTask(Task):
    """Image-text retrieval over the subset's images and all of their captions."""

    primary_metrics = ("i2t_R@1", "t2i_R@1")

    def __init__(self, ctx: EvalContext, data: EvalData, indices: list[int]):
        super().__init__(ctx, data, indices)
        self.texts = [caption for i in indices for caption in data.captions[i]]
        self.text_to_image = torch.as_tensor([row for row, i in enumerate(indices) for _ in data.captions[i]])
        key = {"kind": "caption-embeddings", **data_key(ctx, data, indices)}
        self.text_embeddings = ctx.cache.get_or_compute(key, lambda: ctx.victim.encode_texts(self.texts).cpu())
        ctx.memo.embed.seed(self.texts, self.text_embeddings)
        self.clean = clean_image_embeddings(ctx, data, indices)
        self.clean_ranks = first_positive_ranks(self.clean, self.text_embeddings, self.text_to_image)
        self.clean_hits = hits_from_ranks(self.clean_ranks)
        # a caption query is named by the position of its image in ``ids``
        self.samples["text_images"] = self.text_to_image.tolist()

    @staticmethod
    def sizes(data: EvalData, indices: list[int]) -> tuple[int, int]:
        return sum(len(data.captions[i]) for i in indices), 0

    def _texts_on(self, victim) -> torch.Tensor:
        """Another model's embeddings of the gallery captions (a transfer attack's surrogate)."""
        return _on(self, victim, lambda: victim.encode_texts(self.texts).to(victim.device))

    def _metrics(self, images: torch.Tensor, texts: torch.Tensor, attacked: bool, **extra: float) -> dict[str, float]:
        metrics = {f"clean_{name}": _top1(hit) for name, hit in self.clean_hits.items()}
        ranks = first_positive_ranks(images, texts, self.text_to_image)
        hits = hits_from_ranks(ranks)
        self.samples.update({f"clean_{d}_rank": r.tolist() for d, r in self.clean_ranks.items()})
        self.samples.update({f"{d}_rank": r.tolist() for d, r in ranks.items()})
        metrics.update({name: _top1(hit) for name, hit in hits.items()})
        if attacked:
            metrics.update(attack_success_rates(self.clean_hits, hits))
        return {**metrics, **extra}

    def under_none(self, attack, generator) -> dict[str, float]:
        return self._metrics(self.clean, self.text_embeddings, attacked=False)

    def under_image(self, attack, generator) -> dict[str, float]:
        ctx = self.ctx
        gallery = self.text_embeddings.to(ctx.victim.device)
        row_of = {image: row for row, image in enumerate(self.indices)}
        owner = self.text_to_image.to(ctx.victim.device)

        def objective(images: torch.Tensor, targets: torch.Tensor) -> RetrievalObjective:
            rows = torch.as_tensor([row_of[int(t)] for t in targets], device=owner.device)
            return RetrievalObjective(ctx.victim, gallery, owner[None, :] == rows[:, None], texts_for=self._texts_on)

        images, _ = adversarial_embeddings(ctx, self.data, self.indices, attack, objective, generator)
        return self._metrics(images, self.text_embeddings, attacked=True)

    def under_text(self, attack, generator) -> dict[str, float]:
        ctx = self.ctx
        objective = ImageGuidedTextObjective(ctx.victim, self.texts, self.clean[self.text_to_image].to(ctx.victim.device),
                                             ctx.memo.embed, self.meaning)
        adversarial = attack_texts(attack, ctx, objective, generator)
        return self._metrics(self.clean, ctx.memo.embed(adversarial).cpu(), attacked=True,
                             max_words_changed=words_changed(self.texts, adversarial))

    def under_multimodal(self, attack, generator) -> dict[str, float]:
        ctx = self.ctx
        problem = MultimodalProblem("retrieval", ctx.victim, self.texts, self.text_embeddings.to(ctx.victim.device),
                                    self.clean, text_rows=self.text_to_image,
                                    noise=sample_noise(ctx, self.data, self.indices), memo=ctx.memo,
                                    meaning=self.meaning)
        images, texts, adversarial = run_multimodal(ctx, self.data, self.indices, attack, problem, generator)
        return self._metrics(images, texts, attacked=True, max_words_changed=words_changed(self.texts, adversarial))


def evaluate(ctx: EvalContext, data: EvalData, indices: list[int], attack: Attack,
             generator: torch.Generator, samples: dict | None = None) -> dict[str, float]:
    """The metrics of ``attack`` on ``data[indices]`` through the task its card names;
    ``samples``, if given, receives each sample's outcome (:attr:`Task.samples`)."""
    task = tasks.get(data.task)(ctx, data, indices)
    metrics = task.evaluate(attack, generator)
    if samples is not None:
        samples.update(task.samples)
    return metrics


#: the headline metrics of each registered task, in leaderboard order
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {name: tasks.get(name).primary_metrics for name in tasks.names()}
