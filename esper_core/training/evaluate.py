"""Validation passes of ``esper train``: the task's loss and metric over fixed held-out batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esper_core.growth.evaluation import Evaluation
from esper_core.growth.verdicts import scores_of
from esper_core.training.batches import Batch


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> Evaluation:
    """Mean loss and accuracy over ``batches`` in eval mode (one host-device sync at the end)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = []
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct.append(logits.argmax(dim=1) == y)
    model.train(was_training)
    scores = scores_of(torch.cat(correct)) if correct else torch.zeros(0, dtype=torch.float64)
    count = max(scores.numel(), 1)
    loss, accuracy = float(total_loss) / count, float(scores.sum()) / count
    return Evaluation(accuracy, True, "accuracy", loss, scores, {"loss": loss, "accuracy": accuracy})
