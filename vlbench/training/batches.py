"""Seeded training batches from the training splits of registered datasets, shared by the
defenses that train on them, read through a ``DataLoader`` (:mod:`vlbench.data.loading`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlbench.data.loading import Loading, StepDataset, StepSampler, collate
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
    ground-truth captions, drawn uniformly. The draws are one seeded stream in step order, so
    step ``k``'s batch is the same with any number of loader workers and after a resume.
    """

    def __init__(self, victim, names: list[str], split: str, batch_size: int, seed: int,
                 tasks: tuple[str, ...] = ("classification",), loading: Loading | None = None):
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
        self.seed = seed
        self.device = victim.device
        self.loading = loading or Loading()
        self._all = StepDataset([d.images for d in self.datasets])
        self._iterator = None
        self._next = None
        self._captions: dict[int, list[int]] = {}

    def _draw(self, step: int) -> list[int]:
        """Step ``step``'s sample ids (called in step order from 0): dataset ``step mod D``,
        ``batch_size`` rows uniformly, and for retrieval one caption choice per row."""
        if step == 0:
            self._stream = torch.Generator().manual_seed(self.seed)
        which = step % len(self.datasets)
        data = self.datasets[which]
        picks = torch.randint(len(data), (self.batch_size,), generator=self._stream).tolist()
        if data.task == "retrieval":
            choices = torch.randint(1 << 30, (len(picks),), generator=self._stream).tolist()
            self._captions[step] = [data.captions[i][c % len(data.captions[i])] for i, c in zip(picks, choices)]
        return self._all.flat(which, picks)

    def batch(self, step: int) -> TrainingBatch:
        if self._iterator is None or step != self._next:
            self._captions.clear()
            loader = self.loading.loader(self._all, batch_sampler=StepSampler(self._draw, step), collate_fn=collate)
            self._iterator = iter(loader)
        images, labels = next(self._iterator)
        self._next = step + 1
        images = images.to(self.device, non_blocking=self.loading.pin_memory)
        which = step % len(self.datasets)
        data = self.datasets[which]
        if data.task == "retrieval":
            return TrainingBatch(images, captions=self._captions.pop(step))
        return TrainingBatch(images, labels.to(self.device), self.weights[which], data.classnames)
