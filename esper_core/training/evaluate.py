"""Validation passes, including the counterfactual one that decides a seed's fate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esper_core.seeds.kasmina import KasminaLayer
from esper_core.training.batches import Batch


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> Scores:
    """Mean loss and accuracy over ``batches`` in eval mode (one host-device sync at the end)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return Scores(loss=float(total_loss) / max(count, 1), accuracy=float(correct) / max(count, 1))


@dataclass(frozen=True)
class Counterfactual:
    """The same held-out batches with the seed on and muted; positive ``loss_gain`` means it helps."""

    with_seed: Scores
    without_seed: Scores

    @property
    def loss_gain(self) -> float:
        return self.without_seed.loss - self.with_seed.loss

    @property
    def accuracy_gain(self) -> float:
        return self.with_seed.accuracy - self.without_seed.accuracy


def counterfactual(model: nn.Module, layer: KasminaLayer, index: int, batches: Sequence[Batch],
                   device: torch.device) -> Counterfactual:
    with_seed = evaluate(model, batches, device)
    with layer.muted(index):
        without_seed = evaluate(model, batches, device)
    return Counterfactual(with_seed, without_seed)
