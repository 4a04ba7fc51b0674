"""The optimizer and everything growth does to it, in one place.

Seeds arrive and leave during training. Each seed gets its own parameter group, named by its slot
key, so adding a seed is ``add_param_group`` and removing one drops exactly that group and the state
of its parameters: nothing is matched by position. The learning-rate schedule is applied here too,
as a factor on each group's ``base_lr``, because PyTorch's LR schedulers fix their group list at
construction and would silently ignore groups added later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from esper_core.recipe.schema import TrainerConfig

HOST_GROUP = "host"


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "name": HOST_GROUP, "base_lr": cfg.lr}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([group], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam([group], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW([group], lr=cfg.lr, weight_decay=cfg.weight_decay)


def add_group(optimizer: torch.optim.Optimizer, name: str, params: Iterable[nn.Parameter], base_lr: float) -> None:
    """Give new parameters their own group; the group's current LR follows the schedule."""
    if any(g.get("name") == name for g in optimizer.param_groups):
        raise ValueError(f"optimizer already has a parameter group named {name!r}")
    factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["base_lr"]
    optimizer.add_param_group({"params": list(params), "name": name, "base_lr": base_lr, "lr": base_lr * factor})


def remove_group(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Forget a group and the optimizer state of its parameters (moments would otherwise leak)."""
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") == name:
            for p in group["params"]:
                optimizer.state.pop(p, None)
            del optimizer.param_groups[i]
            return
    raise KeyError(f"optimizer has no parameter group named {name!r}")


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of every base LR at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def apply_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainerConfig) -> None:
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def export_state(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter *name* (tensors) plus group settings and scalar state (JSON).

    Names, not positions, because seeds add and remove parameters: a position recorded before a
    cull points at a different parameter after it.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({"settings": settings, "params": [names[p] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{names[p]}/{key}"] = value
                else:
                    scalars.setdefault(names[p], {})[key] = value
    return tensors, {"groups": groups, "scalars": scalars}


def import_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor],
                 meta: dict) -> None:
    """Inverse of :func:`export_state`; the optimizer must already have groups of the same names."""
    by_name = {g["name"]: g for g in optimizer.param_groups}
    if [g["settings"]["name"] for g in meta["groups"]] != [g["name"] for g in optimizer.param_groups]:
        raise ValueError("checkpoint optimizer groups do not match the rebuilt model")
    for saved in meta["groups"]:
        group = by_name[saved["settings"]["name"]]
        restored = [params[n] for n in saved["params"]]
        if len(restored) != len(group["params"]) or any(a is not b for a, b in zip(restored, group["params"])):
            raise ValueError(f"parameters of optimizer group {saved['settings']['name']!r} do not match")
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved["settings"].items()})
    optimizer.state.clear()
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, field = key[len("optim/"):].rpartition("/")
            param = params[name]
            optimizer.state[param][field] = value.to(param.device) if field != "step" else value
    for name, values in meta["scalars"].items():
        optimizer.state[params[name]].update(values)
