"""Seeded training batches from the training splits of registered datasets, shared by the
defenses that train on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlbench.errors import UserError


@dataclass
class TrainingBatch:
    """One training batch: images with their class labels and class-prompt embeddings
    (classification datasets), or with one ground-truth caption each (retrieval datasets)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_weights: torch.Tensor | None = None
    classnames: list[str] | None = None
    captions: list[str] | None = None


class TrainingBatches:
    """Seeded batches from the training splits of the named datasets.

    Step ``k`` draws its batch from dataset ``k mod D`` (round robin), so several tasks over
    the same images (the world's attributes) or several real datasets share one run. Each
    classification dataset's class-prompt embeddings are computed once with the victim's text
    encoder and kept frozen, as in TeCoA's fine-tuning (Mao et al., ICLR 2023, §3); a
    retrieval dataset (only where ``tasks`` allows it) pairs each drawn image with one of its
    ground-truth captions, drawn uniformly.
    """

    def __init__(self, victim, names: list[str], split: str, batch_size: int, seed: int,
                 tasks: tuple[str, ...] = ("classification",)):
        from vlbench.data.datasets import load_dataset
        from vlbench.evaluation.context import classifier_weights

        self.datasets = [load_dataset(name, split=split) for name in names]
        for data in self.datasets:
            if data.task not in tasks:
                raise UserError(f"training on {data.name} needs {' or '.join(tasks)} data, it is {data.task}",
                                f"name {' or '.join(tasks)} datasets in train_datasets")
        with torch.no_grad():
            self.weights = [classifier_weights(victim, d.classnames, d.templates) if d.task == "classification"
                            else None for d in self.datasets]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.device = victim.device

    def batch(self, step: int) -> TrainingBatch:
        which = step % len(self.datasets)
        data = self.datasets[which]
        picks = torch.randint(len(data), (self.batch_size,), generator=self.generator).tolist()
        items = [data.images[i] for i in picks]
        images = torch.stack([item[0] for item in items]).to(self.device)
        if data.task == "retrieval":
            choices = torch.randint(1 << 30, (len(picks),), generator=self.generator).tolist()
            captions = [data.captions[i][c % len(data.captions[i])] for i, c in zip(picks, choices)]
            return TrainingBatch(images, captions=captions)
        labels = torch.as_tensor([int(item[1]) for item in items], device=self.device)
        return TrainingBatch(images, labels, self.weights[which], data.classnames)
