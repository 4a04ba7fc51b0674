"""``load_run``: a finished run (or one of its checkpoints) back as the trained ``nn.Module``.

The model is rebuilt, never unpickled: the host network from the run's saved recipe (its hash checked
against the one the run recorded), the Kasmina layers from the recipe's ``seeds`` section, each seed
from the blueprint IR and target its slot recorded (:meth:`SeedManager.topology`) with Esper's own
resolver and builder, and then every weight from safetensors, verified against its manifest first.
No kernel store, compile or data is needed (a run written before slots recorded their IR falls back
to the blueprint library by name and the recipe's rank; one written before ``final/`` had a manifest
loads with a warning, as there is nothing to verify it against). A module the recipe names code in
whose file changed since the run recorded it is one warning, not a refusal: the recipe itself must
match, but rebuilding a finished model with edited code may be what the user means.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper_core.blueprints.builder import resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.resolve import ResolvedBlueprint
from esper_core.checkpoints import store
from esper_core.errors import CheckpointError, Problem
from esper_core.export.final import read_final
from esper_core.export.grown import Fallback, restore_seeds
from esper_core.growth.state import join
from esper_core.recipe.load import LoadedRecipe
from esper_core.seeds.manager import SeedManager, wrap
from esper_core.training.factory_sources import changed_sources, module_sources
from esper_core.training.saved_recipe import load_saved_recipe, saved_recipe_path

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class LoadedRun:
    """A rebuilt run: the trained model (eval mode, CPU, Kasmina layers in place) and what it came from."""

    model: nn.Module
    manager: SeedManager
    loaded: LoadedRecipe
    run_dir: Path
    source: Path  # final/ or the checkpoint directory
    step: int
    host_model: dict[str, Any]  # input_shape, num_classes
    recipe_dir: Path

    def base_model(self) -> nn.Module:
        """A fresh, unwrapped host network of the recipe (random weights; the global RNG is untouched)."""
        return _host_network(self.loaded, self.host_model)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> nn.Module:
    """The trained model of ``run_dir`` (a run directory or an ``s3://`` run URL): its ``final/``, or
    ``checkpoint`` (a checkpoint directory, or its name such as ``step-00000200``). In eval mode on
    the CPU, with its Kasmina layers; ``esper_core.export.plain.unwrap`` turns it into a plain module.
    Raises :class:`~esper_core.errors.CheckpointError` for a missing, damaged or mismatched run."""
    return open_run(run_dir, checkpoint).model


def open_run(target: str | Path, checkpoint: str | Path | None = None, warn: Warn = _stderr) -> LoadedRun:
    """:func:`load_run` with everything it read (what ``esper export`` needs besides the model)."""
    if str(target).startswith("s3://"):
        from esper_core.artifacts.fetch import fetch_run

        remote, _, query = str(target).partition("?")  # ?endpoint_url=... stays at the end
        # a trailing slash goes, never the scheme's: "s3://".rstrip("/") would leave "s3:" for the error to name
        remote, query = "s3://" + remote.removeprefix("s3://").rstrip("/"), f"?{query}" if query else ""
        if checkpoint is not None:
            url = f"{remote}/checkpoints/{Path(str(checkpoint)).name}{query}"
            target = fetch_run(url, "checkpoint").parent.parent
        else:
            target = fetch_run(remote + query, "final")
    run_dir = Path(target)
    saved_recipe_path(run_dir)
    if checkpoint is None:
        final = read_final(run_dir, warn)
        tensors, topology, info, source = final.tensors, final.topology, final.manifest, final.path
        record, where = info, str(source)
    else:
        path = Path(checkpoint)
        if not path.is_dir():
            path = run_dir / "checkpoints" / str(checkpoint)
        if not path.is_dir():
            found = ", ".join(p.name for p in store.committed(run_dir / "checkpoints")) or "none"
            raise CheckpointError(Problem(str(path), f"no such checkpoint (the run has: {found})"))
        loaded_checkpoint = store.load(path)
        try:
            state = join(loaded_checkpoint.tensors, loaded_checkpoint.state["run"])
            tensors, topology = state["model"], state["controller"]["topology"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(Problem(str(path / store.STATE), f"not a run checkpoint ({exc})")) from None
        info, source = loaded_checkpoint.manifest, path
        record = {**loaded_checkpoint.state, "recipe_sha256": info.get("recipe_sha256")}
        where = str(path)
    # the data file is needed only to measure the host's shapes (runs from before host_model), and
    # building the data reports it if it is gone
    loaded, recipe_record = load_saved_recipe(run_dir, record, where, check_data=False)
    recipe_dir = loaded.base_dir
    host_model = info.get("host_model") or _shapes_from_data(loaded, recipe_dir)
    model = _host_network(loaded, host_model)
    # a warning, not a refusal (as a resume's): rebuilding a finished model with edited code may be meant
    for problem in changed_sources(loaded, recipe_record.code, module_sources(loaded),
                                   "the model is rebuilt with code other than the run's"):
        warn(f"warning: {problem}")
    manager = wrap(model, config=loaded.recipe.seeds)
    topology_file = source / "topology.json" if checkpoint is None else source / store.STATE
    restore_seeds(manager, topology, str(topology_file), _library(loaded, recipe_dir))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(Problem(str(source), "the weights do not fit the model rebuilt from the recipe and "
                                      f"topology ({' '.join(first[:2])[:300]})")) from None
    model.eval()
    return LoadedRun(model, manager, loaded, run_dir, source, int(topology.get("step", 0)), host_model, recipe_dir)


def _shapes_from_data(loaded: LoadedRecipe, recipe_dir: Path) -> dict[str, Any]:
    """An old run recorded no host shapes: read the data once to learn them."""
    from esper_core.training.data import build_data

    recipe = loaded.recipe
    with loaded.importable():
        data = build_data(recipe.data, recipe.run.seed, recipe_dir, recipe.task.kind, recipe.task.target_key)
    return {"input_shape": list(data.input_shape), "num_classes": data.num_classes}


def _host_network(loaded: LoadedRecipe, host_model: dict[str, Any]) -> nn.Module:
    from esper_core.training.models import build_model

    with torch.random.fork_rng(devices=[]), loaded.importable():  # initial weights are overwritten anyway
        return build_model(loaded.recipe.model, tuple(host_model["input_shape"]), int(host_model["num_classes"]))


def _library(loaded: LoadedRecipe, recipe_dir: Path) -> Fallback:
    """Seeds of a run written before slots recorded their IR: the blueprint library by name, at the
    recipe's rank (discovered once, when the first such seed is met)."""
    library: list[Any] = []

    def resolved(blueprint: str, host: HostSpec) -> ResolvedBlueprint:
        if not library:
            from esper_core.blueprints.library import BlueprintLibrary

            library.append(BlueprintLibrary.discover([recipe_dir / d for d in loaded.recipe.seeds.blueprint_dirs]))
        return resolve(library[0].get(blueprint).blueprint, host, loaded.recipe.seeds.rank)
    return resolved
