"""Checkpoints for a user's own loop: model, optimizer, growth controller and RNGs in Esper's format.

The same atomic, hash-verified directories ``esper train`` writes (safetensors + JSON, never a
pickle): ``<directory>/checkpoints/step-NNNNNNNN/`` with ``LATEST``. Order matters on load and is
handled here: the controller rebuilds the seed topology (modules and optimizer groups) first, then
the model's weights and the optimizer's state (by parameter name) are loaded into it. ``extra``
carries the loop's own position (epoch, batch, anything JSON or tensors).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from esper_core.checkpoints import store
from esper_core.errors import CheckpointError, Problem
from esper_core.growth import optimizer as optim
from esper_core.growth.controller import GrowthController
from esper_core.growth.state import State, join, rng_state, set_rng_state, split
from esper_core.seeds.probe import check_module

FORMAT = "esper-own-loop/1"


def _check_parts(call: str, model: object, optimizer: object, growth: object) -> None:
    """The three things a loop's checkpoint holds, each of its type; a ``None`` optimizer or
    controller failed from inside Esper's code with an ``AttributeError`` naming neither."""
    check_module(model, f"{call}(model=...)")
    for name, value, kind in (("optimizer", optimizer, torch.optim.Optimizer), ("growth", growth, GrowthController)):
        if not isinstance(value, kind):
            raise TypeError(f"{call}({name}=...): the loop's {kind.__module__}.{kind.__name__}, "
                            f"not {type(value).__name__}")


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    growth: GrowthController, extra: State | None = None, keep: int = 3) -> Path:
    """Commit a checkpoint of the loop at ``growth.step`` and keep the newest ``keep``; returns its path."""
    _check_parts("save_checkpoint", model, optimizer, growth)
    state = {"model": dict(model.state_dict()), "optimizer": optim.export_state(optimizer, model),
             "growth": growth.state_dict(), "rng": rng_state(), "extra": extra or {}}
    tensors, skeleton = split(state)
    checkpoints = Path(directory) / "checkpoints"
    path = store.save(checkpoints, growth.step, tensors, {"run": skeleton}, {"kind": FORMAT})
    store.retain(checkpoints, keep, lambda manifest: None)
    return path


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    growth: GrowthController, strict: bool = False) -> State:
    """Restore the newest verified checkpoint under ``path`` (a directory given to
    :func:`save_checkpoint`, or one checkpoint directory) and return its ``extra``. A damaged newest
    checkpoint is skipped with a warning for the one before, unless ``strict``."""
    _check_parts("load_checkpoint", model, optimizer, growth)
    found = store.find(Path(path), strict, lambda message: print(message, file=sys.stderr))
    if found.manifest.get("kind") != FORMAT:
        raise CheckpointError(Problem(str(found.path), "not an own-loop checkpoint (use esper resume for runs "
                                      "of esper train)"))
    try:
        state = join(found.tensors, found.state["run"])
        growth.check_snapshot(state["growth"])
        growth.load_state_dict(state["growth"])
        model.load_state_dict(state["model"], strict=True)
        optim.import_state(optimizer, model, state["optimizer"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(Problem(str(found.path), f"does not fit this model and optimizer ({exc})")) from None
    return state["extra"]
