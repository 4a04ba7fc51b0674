"""Tiny user-side factories for the `factory` data and model sources (imported by spec in tests)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def blobs(n: int = 60, features: int = 4) -> TensorDataset:
    """One dataset of two shifted Gaussian blobs, for Esper to split."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, features, generator=gen) + 3.0 * y[:, None]
    return TensorDataset(x, y)


class _Images(Dataset):
    """A plain map-style dataset without a `targets` attribute (labels are read by iterating)."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), float(index + self.offset)), (index + self.offset) % 3


def image_splits() -> tuple[Dataset, Dataset, Dataset]:
    """Ready-made (train, val, test) image datasets."""
    return _Images(12, 0), _Images(6, 100), _Images(6, 200)


def not_a_dataset() -> list[int]:
    return [1, 2, 3]


def linear_model(input_shape: tuple[int, ...], num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(input_shape).numel(), num_classes, bias=bias))


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "model"
