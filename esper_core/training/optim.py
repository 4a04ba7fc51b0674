"""The optimizer ``esper train`` builds and the learning-rate schedule it applies to the host.

The seed parameter group is not touched here: the growth controller owns it (and its learning
rate). The schedule is a factor on the host group's ``base_lr`` applied before every step
(:mod:`esper_core.training.schedules`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from esper_core.growth.optimizer import SEED_GROUP
from esper_core.recipe.schema import SeedsConfig, TrainerConfig
from esper_core.training.schedules import lr_factor

HOST_GROUP = "host"


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over the model's trainable parameters (the host group; seeds join later
    in a group of their own, which inherits the same implementation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "name": HOST_GROUP, "base_lr": cfg.lr}
    implementation = {"fused": True} if cpu_fused(params) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([group], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **implementation)
    if cfg.optimizer == "adam":
        return torch.optim.Adam([group], lr=cfg.lr, weight_decay=cfg.weight_decay, **implementation)
    return torch.optim.AdamW([group], lr=cfg.lr, weight_decay=cfg.weight_decay, **implementation)


def cpu_fused(params: list[nn.Parameter]) -> bool:
    """Whether to ask for torch's fused optimizer kernel: when every parameter is a floating-point
    tensor on the CPU. There torch's default is its single-tensor loop, a handful of Python-dispatched
    ops per parameter tensor: on the quickstart MLP an AdamW step took 243 us for the host's six tensors
    and 1,330 us once eight span seeds had added 32 more, against 63 us and 237 us fused (2 threads),
    a third of the host's whole training step. On CUDA torch's default (``foreach``) already batches
    the tensors, and the fused kernel measured no faster on the H200, so the default stays."""
    return bool(params) and all(p.device.type == "cpu" and p.is_floating_point() for p in params)


def seed_lr(step: int, trainer: TrainerConfig, seeds: SeedsConfig, window_end: float) -> float:
    """The seed groups' own learning rate at optimizer step ``step`` (see ``seeds.lr_schedule``; the
    growth controller caps ``adaptive``'s at the host's once the run stops improving, see
    :mod:`esper_core.growth.seed_rate`); ``window_end`` is the share of the run after which growth stops."""
    base = trainer.lr * seeds.lr_scale
    if seeds.lr_schedule == "host":
        return base * lr_factor(step, trainer)
    end = window_end * trainer.max_steps
    if step < end:
        return base
    progress = min(1.0, (step - end) / max(1.0, trainer.max_steps - end))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainerConfig) -> None:
    """Set the host groups' LR for step ``step``."""
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        if not group.get(SEED_GROUP):
            group["lr"] = group["base_lr"] * factor
