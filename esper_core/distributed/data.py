"""Each rank's share of the held-out data.

Validation, verdicts and the final test evaluation run on every rank over its own contiguous block
of the held-out set; the sums are all-reduced and the per-sample scores gathered in rank order
(:meth:`esper_core.training.tasks.Task.evaluate`), so the figures a rank sees are those of the whole
set, in dataset order, as a single process computes them (up to summation order). Training batches
are sharded by :class:`esper_core.training.loaders.TrainBatches` itself, which keeps the position.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from esper_core.errors import ConfigError, Problem


def shard(dataset: Dataset, rank: int, size: int, what: str) -> Dataset:
    """Rank ``rank``'s contiguous block of ``dataset`` (in-memory tensors stay a ``TensorDataset``, so
    their batches are still gathered at once). Every rank needs at least one sample: a rank with
    nothing to evaluate would contribute no per-batch statistics to the reductions."""
    total = len(dataset)  # type: ignore[arg-type]
    if total < size:
        raise ConfigError(Problem("recipe", f"the {what} split has {total} samples, fewer than the {size} ranks",
                                  field="data"))
    start, stop = rank * total // size, (rank + 1) * total // size
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[start:stop] for t in dataset.tensors))
    return Subset(dataset, range(start, stop))


SAMPLED = 8
"""Samples of each split that :func:`digest` reads (evenly spaced, first and last included)."""


def digest(splits: dict[str, Dataset]) -> str:
    """A digest of the splits the ranks built: each split's length and the bytes of a few samples.

    Every rank builds the data itself (nothing is sent from rank 0), and nothing later notices when the
    ranks built different data: DDP averages the gradients and every reduction adds each rank's share,
    so the replicas stay identical while training on a mixture no single process would see (a
    ``data.factory`` that draws from an unseeded generator, the time or the rank; a file that differs
    between nodes). Sampling keeps this cheap for any size; a factory whose samples are random differs
    in every sample, so a few suffice."""
    hasher = hashlib.sha256()
    for name, dataset in splits.items():
        try:
            total = len(dataset)  # type: ignore[arg-type]
        except TypeError:  # an iterable dataset: no length, no indexing (refused with several ranks anyway)
            hasher.update(f"{name}:{type(dataset).__name__};".encode())
            continue
        hasher.update(f"{name}:{total};".encode())
        count = min(SAMPLED, total)
        for index in sorted({i * (total - 1) // max(count - 1, 1) for i in range(count)}):
            _feed(hasher, dataset[index])
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    """Add one sample (tensors, arrays, numbers, text, and tuples, lists or dicts of them) to ``hasher``;
    anything else by its type name only (its ``repr`` may hold an address that differs per process)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        hasher.update(f"{value.dtype}{tuple(value.shape)}".encode())
        hasher.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        hasher.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bool, int, float, str, bytes, np.generic)) or value is None:
        hasher.update(repr(value).encode())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(f"{key}=".encode())
            _feed(hasher, value[key])
    elif isinstance(value, (tuple, list)):
        hasher.update(f"[{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(type(value).__name__.encode())
