"""Everything growth does to an optimizer, in one place, by parameter *name*.

Seeds arrive and leave during training. All seeds share one parameter group (named ``seeds``), kept
apart from the user's groups because the growth controller owns its learning rate: adding a seed
appends its parameters to that group, removing one takes exactly those parameters and their state
out (the group itself goes when its last seed does). One group rather than one per seed because a
``foreach``/fused optimizer launches its kernels per group: on an H200 every extra group cost about
0.4 ms a step, a fifth of a small CNN's step with eight seeds. This works on any ``torch.optim``
optimizer the user built (their groups are left as they are). Optimizer state is exported keyed by
parameter name, because a position recorded before a cull points at a different parameter after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SEED_GROUP = "esper_seed"
"""Key marking the parameter group that holds the seeds' parameters."""
SEEDS = "seeds"
"""The seed group's ``name``."""


def seed_group(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The group holding every seed's parameters, or ``None`` while no seed has any."""
    return next((g for g in optimizer.param_groups if g.get(SEED_GROUP)), None)


def host_group(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The first group that is not the seed group (the host's learning rate), or ``None``."""
    if optimizer is None:
        return None
    return next((g for g in optimizer.param_groups if not g.get(SEED_GROUP)), None)


def add_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], lr: float) -> None:
    """Append a new seed's parameters to the seed group (created with ``lr`` and the optimizer's
    defaults for everything else when it is the first seed)."""
    params = list(params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) in held for p in params):
        raise ValueError("a seed parameter is already in the optimizer")
    group = seed_group(optimizer)
    if group is None:
        if any(g.get("name") == SEEDS for g in optimizer.param_groups):
            raise ValueError(f"the optimizer already has a parameter group named {SEEDS!r}")
        optimizer.add_param_group({"params": params, "name": SEEDS, SEED_GROUP: True, "lr": lr})
    else:
        group["params"].extend(params)


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Take a seed's parameters out of the seed group and forget their optimizer state (moments
    would otherwise leak); the group goes with its last parameter."""
    gone = {id(p): p for p in params}
    group = seed_group(optimizer)
    if group is None or not gone.keys() <= {id(q) for q in group["params"]}:
        raise KeyError("the seed's parameters are not in the optimizer's seed group")
    for p in gone.values():
        optimizer.state.pop(p, None)
    group["params"] = [p for p in group["params"] if id(p) not in gone]
    if not group["params"]:  # by identity: comparing group dicts would compare tensors
        del optimizer.param_groups[next(i for i, g in enumerate(optimizer.param_groups) if g is group)]


def group_name(group: dict[str, Any], index: int) -> str:
    """A group's name: ``name`` if it has one (the seed group and ``esper train``'s host group do),
    else ``#index``."""
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
