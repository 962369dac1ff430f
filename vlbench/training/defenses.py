"""The bases of the defenses that train (:class:`TrainingDefense`, and
:class:`AdversarialTrainingDefense` with its image and text adversaries), their parameters,
and the eval-mode helpers their training attacks run under."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from vlbench.api import Defense, check_range
from vlbench.errors import UserError
from vlbench.monitor.cost import Work

from .batches import TrainingBatches
from .loop import OPTIMIZERS, Schedule, TrainingRun, fit


@dataclass
class TrainingParams:
    """The parameters every training defense has; defenses override the defaults with their
    paper's values (defaults here: FARE's ImageNet recipe, Schlarmann et al., ICML 2024)."""

    train_datasets: list = field(default_factory=lambda: ["imagenet"])
    split: str = "train"
    steps: int = 20000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup: int = 1400
    optimizer: str = "adamw"
    seed: int = 0


class TrainingDefense(Defense):
    """A defense trained by the shared loop (:func:`vlbench.training.loop.fit`) on classification
    training splits."""

    Params = TrainingParams
    #: the tasks of the datasets it can train on
    training_tasks: tuple[str, ...] = ("classification",)

    def validate(self) -> None:
        owner = f"defense {self.name}"
        p = self.params
        check_range(owner, "steps", p.steps, 1, 100_000_000)
        check_range(owner, "batch_size", p.batch_size, 1, 1_000_000)
        check_range(owner, "lr", p.lr, 0, 10)
        check_range(owner, "warmup", p.warmup, 0, 100_000_000)
        if p.optimizer not in OPTIMIZERS:
            raise UserError(f"{owner} optimizer {p.optimizer!r} is unknown", f"use one of {OPTIMIZERS}")
        if not p.train_datasets:
            raise UserError(f"{owner} has no train_datasets", "name at least one classification dataset")

    def training_data(self) -> dict:
        return {"datasets": list(self.params.train_datasets), "split": self.params.split}

    def check_training_data(self) -> None:
        from vlbench.data.datasets import get_spec, load_dataset

        for name in self.params.train_datasets:
            task = get_spec(name).task
            if task not in self.training_tasks:
                raise UserError(f"defense {self.name} trains on {' or '.join(self.training_tasks)} data; "
                                f"{name} is a {task} dataset", "name other datasets in train_datasets")
            load_dataset(name, split=self.params.split)  # its files are there, or a one-line error

    def work(self) -> Work:
        """One training pass of the image tower per sample and step (defenses that train
        more add to it)."""
        return Work(image_steps=self.params.steps * self.params.batch_size)

    def schedule(self) -> Schedule:
        p = self.params
        return Schedule(steps=p.steps, lr=p.lr, weight_decay=p.weight_decay, warmup=p.warmup, optimizer=p.optimizer)

    def batches(self, victim, run: TrainingRun | None = None) -> TrainingBatches:
        p = self.params
        return TrainingBatches(victim, list(p.train_datasets), p.split, p.batch_size, p.seed, self.training_tasks,
                               loading=run.loading if run is not None else None)

    def fit_parameters(self, victim, run: TrainingRun, trainable, loss_at, generators: dict) -> dict:
        """Fit ``trainable`` to ``loss_at`` in the shared loop, with this defense's schedule."""
        return fit(victim.model, trainable, self.schedule(), loss_at, desc=f"fit {run.label or self.name}",
                   progress=run.progress, generators=generators, checkpoint_dir=run.workdir,
                   checkpoint_every=run.checkpoint_every, batch_size=self.params.batch_size,
                   precision=victim.precision)


class AdversarialTrainingDefense(TrainingDefense):
    """A training defense with an L∞ image adversary (``eps``, ``attack_steps`` and
    ``attack_step_size`` in its parameters, in 1/255) and, when its parameters name one, a
    text adversary built from a registered text attack (``text_attack``, ``text_params``)."""

    def validate(self) -> None:
        from vlbench.evaluation.components import build_component

        super().validate()
        owner = f"defense {self.name}"
        p = self.params
        check_range(owner, "eps", p.eps, 0, 255, "/255")
        check_range(owner, "attack_step_size", p.attack_step_size, 0, 255, "/255")
        check_range(owner, "attack_steps", p.attack_steps, 0, 10_000)
        name = getattr(p, "text_attack", None)
        self.text_attack = build_component(owner, name, p.text_params, "text") if name else None

    def prepare(self) -> None:
        if self.text_attack is not None:
            self.text_attack.prepare()

    def pending(self):
        return self.text_attack.pending() if self.text_attack is not None else []

    def work(self) -> Work | None:
        p = self.params
        work = super().work() + Work(image_grads=p.steps * p.batch_size * p.attack_steps)
        if self.text_attack is not None:
            text = self.text_attack.work("retrieval", 0, p.batch_size, 0)
            work = None if text is None else work + text * p.steps
        return work

    def text_adversary(self, victim, objective, generator: torch.Generator) -> list[str]:
        """The text attack's texts for ``objective``, found in eval mode like the image
        adversary. The towers have no dropout, so eval mode changes no value here; it lets
        PyTorch run the text tower's attention on its fused inference kernels, about twice as
        fast for the thousands of candidates a step scores."""
        with eval_mode(victim.model), torch.no_grad():
            return self.text_attack.perturb_texts(victim, objective, generator)

    def image_adversary(self, victim, images: torch.Tensor, loss_fn, generator: torch.Generator) -> torch.Tensor:
        """Adversarial images maximising ``loss_fn(x, rows)`` by L∞ PGD, found in eval mode."""
        from vlbench.evaluation.perturb import from_255, linf_pgd

        p = self.params
        return in_eval_mode(victim.model, lambda: linf_pgd(images, loss_fn, from_255(p.eps), from_255(p.attack_step_size),
                                                          p.attack_steps, generator))


@dataclass
class ClassPromptParams(TrainingParams):
    """The class-prompt fine-tuning recipe of the TeCoA lineage (Mao et al., ICLR 2023; README:
    ImageNet, batch 256; code: SGD with momentum 0.9, no weight decay, warmup 1000, 10 epochs
    ≈ 50k steps). lr 1e-5 as TGA-ZSR reruns TeCoA: the paper's own value could not be verified
    (research/defenses.md §3)."""

    steps: int = 50000
    batch_size: int = 256
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: int = 1000
    optimizer: str = "sgd"


def in_eval_mode(model: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``compute`` (a training-time attack) with the model in eval mode, as FARE's and
    TeCoA's training loops do, so batch-norm statistics are not updated by attack steps."""
    with eval_mode(model), torch.enable_grad():
        return compute().detach()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, back in its own mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
