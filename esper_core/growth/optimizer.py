"""Everything growth does to an optimizer, in one place, by parameter *name*.

Seeds arrive and leave during training. Each seed gets its own parameter group, named by its slot
key, so adding a seed is ``add_param_group`` and removing one drops exactly that group and the state
of its parameters: nothing is matched by position. This works on any ``torch.optim`` optimizer the
user built (their groups are left as they are). Optimizer state is exported keyed by parameter
name, because a position recorded before a cull points at a different parameter after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SEED_GROUP = "esper_seed"
"""Key marking a parameter group that holds one seed's parameters (its ``name`` is the slot key)."""


def add_group(optimizer: torch.optim.Optimizer, name: str, params: Iterable[nn.Parameter], lr: float) -> None:
    """Give a new seed's parameters their own group; other settings come from the optimizer's defaults."""
    if any(g.get("name") == name for g in optimizer.param_groups):
        raise ValueError(f"optimizer already has a parameter group named {name!r}")
    optimizer.add_param_group({"params": list(params), "name": name, SEED_GROUP: True, "lr": lr})


def remove_group(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Forget a group and the optimizer state of its parameters (moments would otherwise leak)."""
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") == name:
            for p in group["params"]:
                optimizer.state.pop(p, None)
            del optimizer.param_groups[i]
            return
    raise KeyError(f"optimizer has no parameter group named {name!r}")


def seed_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [g for g in optimizer.param_groups if g.get(SEED_GROUP)]


def group_name(group: dict[str, Any], index: int) -> str:
    """A group's name: the slot key of a seed group, ``name`` if the user set one, else ``#index``."""
    return str(group.get("name", f"#{index}"))


def export_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's groups (settings and parameter names) and per-parameter state, by name."""
    names = {p: n for n, p in model.named_parameters()}
    groups, per_param = [], {}
    for index, group in enumerate(optimizer.param_groups):
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        missing = [p for p in group["params"] if p not in names]
        if missing:
            raise ValueError(f"optimizer group {group_name(group, index)!r} holds parameters that are not in the model")
        groups.append({"name": group_name(group, index), "settings": settings,
                       "params": [names[p] for p in group["params"]]})
        for p in group["params"]:
            if optimizer.state.get(p):
                per_param[names[p]] = dict(optimizer.state[p])
    return {"groups": groups, "state": per_param}


def import_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]) -> None:
    """Inverse of :func:`export_state`; the optimizer must already have groups of the same names
    holding the same parameters (the controller rebuilds seed groups before this runs)."""
    params = dict(model.named_parameters())
    current = [group_name(g, i) for i, g in enumerate(optimizer.param_groups)]
    if [g["name"] for g in saved["groups"]] != current:
        raise ValueError(f"optimizer groups {current} do not match the saved {[g['name'] for g in saved['groups']]}")
    for group, entry in zip(optimizer.param_groups, saved["groups"]):
        restored = [params.get(n) for n in entry["params"]]
        if len(restored) != len(group["params"]) or any(a is not b for a, b in zip(restored, group["params"])):
            raise ValueError(f"parameters of optimizer group {entry['name']!r} do not match the model")
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in entry["settings"].items()})
    optimizer.state.clear()
    for name, values in saved["state"].items():
        if name not in params:
            raise ValueError(f"optimizer state for {name!r}, which the model does not have")
        param = params[name]
        optimizer.state[param] = {k: (v.to(param.device) if isinstance(v, torch.Tensor) and k != "step" else v)
                                  for k, v in values.items()}
