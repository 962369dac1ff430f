"""How images reach the model: ``torch.utils.data.DataLoader`` batches, for evaluation and
for training.

On real datasets each sample is a JPEG to decode and resize; in the main process that
starves a GPU, so ``data_workers`` worker processes decode ahead, batches are pinned in
page-locked memory on CUDA, and a loader's pool persists across the cells of a task (the
same subset at the same batch size is iterated again without new workers). The world's
images are tensors in memory: with no workers the loader runs in the main process, and the
batches are the very tensors the plain loop would stack.

Training batches keep their seeded order with any number of workers: the sampler draws step
``k``'s sample ids in the main process, in step order, from a stream seeded once, so
prefetching reads ahead without changing which images a step sees, and a run resumed at step
``k`` replays the draws of the steps before it (ids only, no images) to continue the same
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class Loading:
    """Settings of the data path; none of them changes a result, so none is in an identity."""

    workers: int = 0
    pin_memory: bool = False

    @classmethod
    def for_device(cls, workers: int, device: str) -> "Loading":
        return cls(workers=workers, pin_memory=str(device).startswith("cuda"))

    def loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.workers, pin_memory=self.pin_memory,
                          persistent_workers=self.workers > 0, **kwargs)


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([item[0] for item in items]), torch.as_tensor([int(item[1]) for item in items])


class _Rows(Dataset):
    """``dataset`` restricted to ``rows``, in that order."""

    def __init__(self, dataset, rows: list[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.dataset[self.rows[index]]


class EvalLoaders:
    """One loader per (dataset, subset, batch size), kept for as long as the cells of a task
    share a victim, so that a worker pool starts once per task and not once per cell."""

    def __init__(self, loading: Loading | None = None):
        self.loading = loading or Loading()
        self._loaders: dict[tuple, DataLoader] = {}

    def batches(self, dataset, rows: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        key = (id(dataset), tuple(rows), batch_size)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self.loading.loader(_Rows(dataset, rows), batch_size=batch_size, shuffle=False, collate_fn=collate)
            if self.loading.workers > 0:
                self._loaders[key] = loader
        return iter(loader)


class StepSampler(Sampler):
    """The sample ids of steps ``first, first + 1, ...``: ``draw(step)`` returns a list of
    flat ids into a :class:`StepDataset`; it is called in step order from step 0 on, so the
    stream is the one an uninterrupted run draws, and the steps before ``first`` are drawn and
    dropped."""

    def __init__(self, draw: Callable[[int], list[int]], first: int):
        self.draw, self.first = draw, first

    def __iter__(self):
        step = 0
        while True:
            ids = self.draw(step)
            if step >= self.first:
                yield ids
            step += 1


class StepDataset(Dataset):
    """Several datasets as one, addressed by flat ids (dataset ``d``'s row ``i`` is
    ``offsets[d] + i``)."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.offsets = [0]
        for dataset in datasets[:-1]:
            self.offsets.append(self.offsets[-1] + len(dataset))

    def flat(self, which: int, rows: list[int]) -> list[int]:
        return [self.offsets[which] + row for row in rows]

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.datasets[-1])

    def __getitem__(self, index: int):
        which = max(d for d, offset in enumerate(self.offsets) if offset <= index)
        return self.datasets[which][index - self.offsets[which]]
