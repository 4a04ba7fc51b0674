"""Seeds rebuilt from a recorded topology with Esper's blueprint builder: no kernel store, no compile.

A topology (:meth:`~esper_core.seeds.manager.SeedManager.topology`) records each seed's canonical
blueprint IR and resolved target, so a grown model comes back from a freshly built host model and its
weights, never from a pickle. Every way a grown model leaves Esper goes through :func:`restore_seeds`:
``load_run`` (a run of ``esper train``, host rebuilt from its recipe), :func:`load_grown` (a checkpoint
of a user's own loop, host built by the user) and ``esper_core.integrations.lightning.rebuild_seeds``
(a Lightning checkpoint, from the module's ``on_load_checkpoint``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from esper_core.blueprints.builder import ResolveError, build, resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.blueprints.resolve import ResolvedBlueprint
from esper_core.checkpoints import store
from esper_core.errors import CheckpointError, ConfigError, Problem
from esper_core.growth.checkpoint import FORMAT
from esper_core.growth.state import join
from esper_core.recipe.schema import SeedsConfig
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.manager import SeedManager, wrap
from esper_core.seeds.probe import check_module

Fallback = Callable[[str, HostSpec], ResolvedBlueprint]
"""How a run written before slots recorded their IR resolves a seed: by blueprint name, for a host."""


def restore_seeds(manager: SeedManager, topology: Any, where: str, fallback: Fallback | None = None) -> None:
    """Recreate each seed ``topology`` records in ``manager``'s layers (weights come afterwards from
    the state dict). Anything that does not fit is a :class:`CheckpointError` naming ``where``."""
    layers = topology.get("layers") if isinstance(topology, dict) else None
    if not isinstance(layers, dict) or set(layers) != set(manager.layers):
        raise CheckpointError(Problem(where, "its seed topology wraps different layers than the model does"))
    recorded = {(name, raw.get("blueprint")): raw for name, entry in layers.items() for raw in entry["slots"]
                if raw.get("ir") and raw.get("target")}
    sources = {(name, raw.get("blueprint")): raw.get("source") for name, entry in layers.items()
               for raw in entry["slots"]}

    def seed_module(layer: str, blueprint: str) -> nn.Module:
        raw = recorded.get((layer, blueprint))
        source = sources.get((layer, blueprint))
        host = manager.layers[layer].spec
        if isinstance(source, str) and source in manager.layers:  # a span seed: sized by its feeder
            host = manager.layers[source].spec.spanning(host)
        try:
            if raw is not None:
                ir = Blueprint.model_validate(raw["ir"])
                target_host = HostSpec.from_json(raw["target"]["host"])
                if target_host != host:
                    raise ValueError(f"the seed was built for {target_host}, the layer is {host}")
                resolved = resolve(ir, target_host, int(raw["target"]["rank"]))
            elif fallback is not None:
                resolved = fallback(blueprint, host)
            else:
                raise ValueError("the topology records no blueprint IR for it")
        except (ValidationError, ResolveError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(Problem(where, f"seed {blueprint!r} on {layer} cannot be rebuilt: "
                                          f"{str(exc).splitlines()[0]}")) from None
        with torch.device("meta"):
            module = build(resolved)
        return module.to_empty(device="cpu")

    try:
        manager.restore(topology, seed_module)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(Problem(where, f"unreadable seed topology ({exc})")) from None


def regrow(model: nn.Module, topology: Any, where: str) -> SeedManager:
    """Give ``model`` the Kasmina layers and seeds ``topology`` records: its layers are wrapped as the
    topology names them (a freshly built host model), or its Kasmina layers are reused (a model that
    is wrapped already, e.g. by the growth controller of a fit about to resume), so that the grown
    model's state dict loads into it strictly."""
    layers = topology.get("layers") if isinstance(topology, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(Problem(where, "unreadable seed topology (no wrapped layers)"))
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, KasminaLayer)}
    if wrapped:
        manager = SeedManager(model, wrapped, SeedsConfig())  # its clock is never run
    else:
        slots = {len(entry["slots"]) if isinstance(entry, dict) and isinstance(entry.get("slots"), list) else -1
                 for entry in layers.values()}
        if len(slots) != 1 or min(slots) < 1:
            raise CheckpointError(Problem(where, "unreadable seed topology (layers with different slot counts)"))
        try:
            manager = wrap(model, targets=[f"re:{re.escape(name)}" for name in layers], per_layer=slots.pop())
        except ConfigError as exc:
            raise CheckpointError(Problem(where, f"its seeds grow on layers this model cannot wrap "
                                          f"({', '.join(layers)}): {exc.problems[0].message}")) from None
    restore_seeds(manager, topology, where)
    return manager


def load_grown(path: str | Path, *, model: nn.Module, strict: bool = False) -> nn.Module:
    """The model a user's own loop grew, back from a checkpoint :func:`~esper_core.save_checkpoint` wrote
    (a directory given to it, or one checkpoint directory): ``model`` is a freshly built host model
    (the user's own class, as before growth); its layers are wrapped and its seeds rebuilt as the
    checkpoint records them, then every weight is loaded strictly. Returns ``model``, in eval mode.
    Needs no optimizer, growth controller, kernel store or compile (for inference, export or
    fine-tuning; :func:`~esper_core.load_checkpoint` resumes growth). A damaged newest checkpoint is
    skipped with a warning for the one before, unless ``strict``."""
    check_module(model, "load_grown(model=...)")
    found = store.find(Path(path), strict, lambda message: print(message, file=sys.stderr))
    where = str(found.path)
    if found.manifest.get("kind") != FORMAT:
        raise CheckpointError(Problem(where, "not an own-loop checkpoint (a run of esper train loads with "
                                      "esper_core.load_run)"))
    try:
        state = join(found.tensors, found.state["run"])
        topology, weights = state["growth"]["topology"], state["model"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(Problem(where, f"not an own-loop checkpoint ({exc})")) from None
    regrow(model, topology, where)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(Problem(where, "the weights do not fit this model rebuilt with the checkpoint's "
                                      f"seeds ({' '.join(first[:2])[:300]})")) from None
    return model.eval()
