"""Gradient accumulation (``trainer.accumulate_steps``): one optimizer step over several micro-batches.

The sampler hands out one batch of ``batch_size x accumulate_steps`` samples per optimizer step and
:func:`micro_batches` cuts it into equal micro-batches: the data order, the epochs and the data
position of a checkpoint are then exactly those of a run with the large batch, and every counter
(lifecycle, schedules, checkpoints, ``eval_every``) counts optimizer steps by construction. Only the
micro-batches' activations are alive at once.

Each micro-batch's mean loss is backpropagated as is (gradients sum) and :func:`average_gradients`
divides the sum once, before clipping and the step: the mean of equal micro-batch means is the mean
over the large batch, so the step matches one large batch up to float rounding. Backpropagating
unscaled losses keeps the first micro-batch's gradients at the scale of an ordinary step, which is
what the growth controller's health measurement reads (it measures the first micro-batch), and an
incubating seed's proximal pull sums and is averaged with the gradient it joins.
"""

from __future__ import annotations

from typing import Any

import torch


def micro_batches(batch: Any, count: int) -> list[Any]:
    """``batch`` (a collated batch: tensors in tuples, lists or dicts; lists of non-tensors such as
    strings) cut into ``count`` equal parts along the batch dimension, in order."""
    if count == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(count))
    if isinstance(batch, dict):
        parts = {key: micro_batches(value, count) for key, value in batch.items()}
        return [{key: parts[key][i] for key in batch} for i in range(count)]
    if isinstance(batch, (tuple, list)) and any(isinstance(v, (torch.Tensor, dict, tuple, list)) for v in batch):
        columns = [micro_batches(value, count) for value in batch]
        return [type(batch)(column[i] for column in columns) for i in range(count)]
    if isinstance(batch, (tuple, list)):  # one value per sample
        size = -(-len(batch) // count)
        return [batch[i * size:(i + 1) * size] for i in range(count)]
    return [batch] * count  # a value shared by every sample


def average_gradients(optimizer: torch.optim.Optimizer, count: int) -> None:
    """Divide the summed gradients of ``count`` micro-batches by ``count`` (one fused kernel)."""
    if count == 1:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / count)
