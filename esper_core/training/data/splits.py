"""Splits: deterministic, stratified train/val/test partitions, and feature standardisation.

Everything is a pure function of the run seed: the split draws from its own numpy stream (the global
RNGs are never touched), so changing the split fractions never changes generated samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import DataConfig


@dataclass(frozen=True)
class DataSplits:
    """The three splits and what a model needs to know about them.

    ``input_shape`` is one sample's main input (the tensor input, or ``input_ids`` of dict samples);
    ``num_classes`` is the size of the model's output: classes, regression targets, or vocabulary.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    target_key: str = "labels"  # of dict samples
    input_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    """(mean, std) the inputs were standardised with (``data.standardize``: statistics of the training
    split), ``None`` when they were not: a model trained here expects ``(x - mean) / std``."""
    fingerprint: str | None = None
    """sha256 of the user's file the splits were read from (``source: file`` or ``text``), so a resume
    can tell that the data changed under the run; ``None`` for data Esper bundles or generates."""

    def example(self, n: int) -> Any:
        """The model inputs of the first ``n`` training samples: what probes the layers' input shapes."""
        from esper_core.training.loaders import first_inputs

        return first_inputs(self.train, n, self.target_key)


class Arrays(NamedTuple):
    """A whole dataset in memory before splitting."""

    x: np.ndarray  # (N, *input_shape)
    y: np.ndarray  # (N,) int64 class ids, or (N,)/(N, D) float32 targets
    num_classes: int
    name: str


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted (train, val, test) index arrays covering ``range(len(labels))``.

    Stratified by systematic sampling: samples are shuffled, ordered by label (a class id, or a
    regression target's value), and every ``1/fraction``-th one is taken. Each class then gets its
    proportional share to within one sample while the split sizes are exact.
    """
    n = len(labels)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise ConfigError(Problem(RECIPE_FIELD, f"only {n} samples: too few to fill train, val and test",
                                  field="data"))
    order = rng.permutation(n)
    keys = labels if labels.ndim == 1 else labels.reshape(n, -1)[:, 0]
    order = order[np.argsort(keys[order], kind="stable")]
    test_pos = _evenly_spaced(n, n_test)
    rest = np.delete(order, test_pos)
    val_pos = _evenly_spaced(len(rest), n_val)
    return np.sort(np.delete(rest, val_pos)), np.sort(rest[val_pos]), np.sort(order[test_pos])


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """``k`` distinct positions spread evenly over ``range(n)`` (``k <= n``)."""
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


def split_arrays(arrays: Arrays, cfg: DataConfig, rng: np.random.Generator) -> DataSplits:
    train_idx, val_idx, test_idx = split_indices(arrays.y, cfg.val_fraction, cfg.test_fraction, rng)
    x, y = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y)
    stats = None
    if cfg.standardize and x.is_floating_point():
        stats = feature_stats([x[train_idx]])
        x = (x - stats[0]) / stats[1]
    return DataSplits(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]),
                      TensorDataset(x[test_idx], y[test_idx]), tuple(arrays.x.shape[1:]), arrays.num_classes,
                      arrays.name, input_stats=stats)


def feature_stats(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature, or per channel for (N, C, H, W) images, broadcastable to a sample.

    Images use one mean/std per channel rather than per pixel: per-pixel statistics would blow up
    near-constant border pixels (digits' edges are almost always 0) into large noisy values and
    would make the same stroke look different in different places, which fights the translation
    equivariance convolutions rely on. Constant features keep std 1 (they become 0, not NaN).
    Accumulated in float64 over a stream of batches so a factory dataset need not fit in memory.
    """
    mean = m2 = None
    count = 0
    for x in batches:  # Chan et al.'s pairwise update: exact zeros for constant features
        x = x.double()
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        batch_mean = x.mean(dims, keepdim=True)
        batch_m2 = ((x - batch_mean) ** 2).sum(dims, keepdim=True)
        n = x.numel() // batch_mean.numel()
        if mean is None:
            mean, m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - mean
            mean = mean + delta * n / (count + n)
            m2 = m2 + batch_m2 + delta**2 * count * n / (count + n)
        count += n
    assert mean is not None and m2 is not None, "no samples to standardise"
    mean, std = mean[0], (m2[0] / count).sqrt()
    std = torch.where(std > 1e-7 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return mean.float(), std.float()
