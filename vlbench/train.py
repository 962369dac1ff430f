"""The training loop defenses share: AdamW with linear warmup and cosine decay, seeded,
with a progress bar, a declared set of trainable parameters, and a stop on a non-finite loss.

A defense supplies ``loss_at(step) -> scalar tensor``; everything else (which parameters
move, the schedule, determinism) is decided here so that defenses differ only in their
objective.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Schedule:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to zero (open_clip's ``cosine_lr``)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * self.lr


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Make exactly ``trainable`` require gradients; return them."""
    keep = {id(p) for p in trainable}
    params = []
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in keep)
        if id(parameter) in keep:
            params.append(parameter)
    return params


def run_training(model: nn.Module, trainable: Iterable[nn.Parameter], schedule: Schedule,
                 loss_at: Callable[[int], torch.Tensor], desc: str = "train",
                 progress: bool = True) -> dict:
    """Optimise ``loss_at`` over ``schedule.steps`` steps; return a summary for the record."""
    params = freeze_all_but(model, trainable)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    model.train()
    started = time.perf_counter()
    losses = []
    bar = tqdm(range(schedule.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.requires_grad_(False)
    return {"steps": schedule.steps, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 2)}


class ClassificationBatches:
    """Seeded batches from the training splits of zero-shot classification datasets.

    Step ``k`` draws its batch from dataset ``k mod D`` (round robin), so several tasks over
    the same images (the world's attributes) or several real datasets share one run. Each
    dataset's class-prompt embeddings are computed once with the victim's text encoder and
    kept frozen, as in TeCoA's fine-tuning (Mao et al., ICLR 2023, §3).
    """

    def __init__(self, victim, names: list[str], split: str, batch_size: int, seed: int):
        from .datasets import load_dataset
        from .tasks import classifier_weights

        self.datasets = [load_dataset(name, split=split) for name in names]
        for data in self.datasets:
            if data.task != "classification":
                raise ValueError(f"{data.name} is a {data.task} dataset; training needs classification")
        with torch.no_grad():
            self.weights = [classifier_weights(victim, d.classnames, d.templates) for d in self.datasets]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device = victim.device

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, labels, class_weights)`` for ``step``."""
        which = step % len(self.datasets)
        data = self.datasets[which]
        picks = torch.randint(len(data), (self.batch_size,), generator=self.generator).tolist()
        items = [data.images[i] for i in picks]
        images = torch.stack([item[0] for item in items]).to(self.device)
        labels = torch.as_tensor([int(item[1]) for item in items], device=self.device)
        return images, labels, self.weights[which]
