"""Everything growth does to an optimizer, in one place, by parameter *name*.

Seeds arrive and leave during training. All seeds share one parameter group (named ``seeds``), kept
apart from the user's groups because the growth controller owns its learning rate: adding a seed
appends its parameters to that group, removing one takes exactly those parameters and their state
out. The group is added (empty) when the controller binds the optimizer and stays, empty or not, so
the optimizer's number of groups never changes during training: PyTorch's learning-rate schedulers
keep one value per group (``LambdaLR``, ``OneCycleLR``, ``CyclicLR``, ``ReduceLROnPlateau``) and fail
when a group appears or goes after they were built. A scheduler built before the group existed is
extended to cover it (:func:`cover_schedulers`); whatever it computes for the seed group, the
controller sets that group's learning rate before each step. One group rather than one per seed
because a ``foreach``/fused optimizer launches its kernels per group: on an H200 every extra group cost about
0.4 ms a step, a fifth of a small CNN's step with eight seeds. This works on any ``torch.optim``
optimizer the user built (their groups are left as they are). Optimizer state is exported keyed by
parameter name, because a position recorded before a cull points at a different parameter after it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SEED_GROUP = "esper_seed"
"""Key marking the parameter group that holds the seeds' parameters."""
SEEDS = "seeds"
"""The seed group's ``name``."""
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adamax,
               torch.optim.ASGD, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop)
"""Optimizers whose per-parameter state tensors are scalars (``step``) or shaped like the parameter.
For these, :func:`import_state` refuses any other tensor: it would otherwise fail inside
``optimizer.step()``, a traceback at the first step after a resume instead of a refused checkpoint."""


def seed_group(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The group holding every seed's parameters, or ``None`` while no seed has any."""
    return next((g for g in optimizer.param_groups if g.get(SEED_GROUP)), None)


def host_group(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The first group that is not the seed group (the host's learning rate), or ``None``."""
    if optimizer is None:
        return None
    return next((g for g in optimizer.param_groups if not g.get(SEED_GROUP)), None)


def ensure_seed_group(optimizer: torch.optim.Optimizer, lr: float) -> dict[str, Any]:
    """The seed group, added (empty, at ``lr``) when the optimizer has none. Besides the optimizer's
    defaults it carries every other key the host's group has (those a scheduler wrote there, such as
    ``initial_lr`` or ``max_lr``), so a scheduler that reads them from each group finds them."""
    group = seed_group(optimizer)
    if group is not None:
        return group
    if any(g.get("name") == SEEDS for g in optimizer.param_groups):
        raise ValueError(f"the optimizer already has a parameter group named {SEEDS!r}")
    host = host_group(optimizer) or {}
    extra = {k: v for k, v in host.items() if k not in optimizer.defaults and k not in ("params", "name", "lr")}
    optimizer.add_param_group({**extra, "params": [], "name": SEEDS, SEED_GROUP: True, "lr": lr})
    return optimizer.param_groups[-1]


def add_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], lr: float) -> None:
    """Append a new seed's parameters to the seed group (added at ``lr`` if the optimizer has none)."""
    params = list(params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) in held for p in params):
        raise ValueError("a seed parameter is already in the optimizer")
    ensure_seed_group(optimizer, lr)["params"].extend(params)


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Take a seed's parameters out of the seed group and forget their optimizer state (moments
    would otherwise leak); the group stays, empty or not (see the module docstring)."""
    gone = {id(p): p for p in params}
    group = seed_group(optimizer)
    if group is None or not gone.keys() <= {id(q) for q in group["params"]}:
        raise KeyError("the seed's parameters are not in the optimizer's seed group")
    for p in gone.values():
        optimizer.state.pop(p, None)
    group["params"] = [p for p in group["params"] if id(p) not in gone]


def has_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``torch.optim.lr_scheduler`` scheduler has been built on ``optimizer`` (PyTorch marks
    the optimizer's ``step`` when one is)."""
    return hasattr(optimizer.step, "_wrapped_by_lr_sched")


_NOT_PER_GROUP = frozenset({"_milestones", "milestones", "_schedulers", "optimizer"})
"""Scheduler attributes that are lists but not one entry per parameter group."""


def cover_schedulers(optimizer: torch.optim.Optimizer, schedulers: Iterable[Any]) -> None:
    """Extend schedulers built on ``optimizer`` before its seed group existed so they cover it: every
    per-group list they keep (base and last learning rates, ``LambdaLR``'s functions, ``CyclicLR``'s
    bounds, ``ReduceLROnPlateau``'s floors, ...) gets an entry for the seed group, copied from the
    host's. A scheduler that already covers every group is left as it is; one that wraps others
    (``SequentialLR``, ``ChainedScheduler``) is covered through them."""
    groups = len(optimizer.param_groups)
    index = next((i for i, g in enumerate(optimizer.param_groups) if g.get(SEED_GROUP)), None)
    host = next((i for i, g in enumerate(optimizer.param_groups) if not g.get(SEED_GROUP)), None)
    if index is None or host is None:
        return
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError(f"{type(scheduler).__name__} schedules another optimizer than the one growth adds "
                             "seeds to")
        cover_schedulers(optimizer, getattr(scheduler, "_schedulers", ()))
        for name, value in vars(scheduler).items():
            if name not in _NOT_PER_GROUP and isinstance(value, list) and len(value) == groups - 1:
                value.insert(index, copy.copy(value[host]))


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
    return {"type": type(optimizer).__name__, "groups": groups, "state": per_param}


def import_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]) -> None:
    """Inverse of :func:`export_state`; the optimizer must already have groups of the same names
    holding the same parameters (the controller rebuilds seed groups before this runs), and be of the
    saved type: another optimizer's state loads without complaint into any ``torch.optim`` optimizer,
    and its first step then fails inside torch (SGD's ``momentum_buffer`` is no ``exp_avg``)."""
    kind = type(optimizer).__name__
    if saved.get("type", kind) != kind:  # checkpoints written before the type was recorded: not checked
        raise ValueError(f"the checkpoint's optimizer is {saved['type']}, this one is {kind}")
    params = dict(model.named_parameters())
    current = [group_name(g, i) for i, g in enumerate(optimizer.param_groups)]
    if SEEDS not in [g["name"] for g in saved["groups"]] and (group := seed_group(optimizer)) is not None \
            and not group["params"]:  # saved before the seed group was added at bind: restore around it
        saved = {**saved, "groups": [*saved["groups"], {"name": SEEDS, "settings": {k: v for k, v in group.items()
                                                                                   if k != "params"}, "params": []}]}
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
        if isinstance(optimizer, ELEMENTWISE):
            _check_elementwise(name, param, values)
        optimizer.state[param] = {k: (v.to(param.device) if isinstance(v, torch.Tensor) and k != "step" else v)
                                  for k, v in values.items()}


def _check_elementwise(name: str, param: nn.Parameter, values: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless each tensor of ``values`` is a scalar or has ``param``'s shape and dtype."""
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.dim() and (value.shape, value.dtype) != (param.shape, param.dtype):
            raise ValueError(f"optimizer state {key!r} of {name!r} is {tuple(value.shape)} {value.dtype}, but the "
                             f"parameter is {tuple(param.shape)} {param.dtype}")
