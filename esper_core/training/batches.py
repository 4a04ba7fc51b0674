"""Deterministic batching with a position that can be saved and restored.

The trainer does its own batching instead of using a DataLoader iterator because a checkpoint must
record exactly where in which epoch's permutation training stopped, and an iterator cannot say.
Each epoch's permutation is a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

Batch = tuple[torch.Tensor, torch.Tensor]


def fetch(dataset: Dataset, indices: torch.Tensor) -> Batch:
    """Gather samples; tensor datasets are sliced directly (the common, fast case)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0][indices], dataset.tensors[1][indices]
        return x, y
    x, y = default_collate([dataset[int(i)] for i in indices])
    return x, y


@dataclass
class EpochSampler:
    """Shuffled training batches, epoch after epoch, dropping a ragged last batch."""

    dataset: Dataset
    batch_size: int
    seed: int
    epoch: int = 0
    offset: int = 0  # batches already taken from the current epoch

    def __post_init__(self) -> None:
        self.size = len(self.dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = max(1, self.size // self.batch_size)
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def next(self) -> Batch:
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.offset * self.batch_size
        self.offset += 1
        return fetch(self.dataset, self._perm[start:start + self.batch_size])

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def seek(self, epoch: int, offset: int) -> None:
        """Continue from a recorded :meth:`position` (the permutation is a function of the epoch)."""
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)


def ordered_batches(dataset: Dataset, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """Evaluation batches in dataset order (the same batches every time)."""
    size = len(dataset)  # type: ignore[arg-type]
    for n, start in enumerate(range(0, size, batch_size)):
        if limit is not None and n >= limit:
            return
        yield fetch(dataset, torch.arange(start, min(size, start + batch_size)))
