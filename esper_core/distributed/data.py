"""Each rank's share of the held-out data.

Validation, verdicts and the final test evaluation run on every rank over its own contiguous block
of the held-out set; the sums are all-reduced and the per-sample scores gathered in rank order
(:meth:`esper_core.training.tasks.Task.evaluate`), so the figures a rank sees are those of the whole
set, in dataset order, as a single process computes them (up to summation order). Training batches
are sharded by :class:`esper_core.training.loaders.TrainBatches` itself, which keeps the position.
"""

from __future__ import annotations

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
