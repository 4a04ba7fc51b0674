"""The kernel targets of a recipe: every distinct wrapped layer (and layer pair, for span seeds) with
the input its seeds really read.

Used by ``esper compile --for RECIPE`` so CI can compile ahead of time exactly the kernels a run
will ask for. It builds the recipe's data and model (a throwaway copy; the global RNG is left as it
was), wraps the targets and probes the layers with a real batch, as the growth controller does.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from esper_core.compiler.targets import Target
from esper_core.recipe.load import LoadedRecipe
from esper_core.seeds.manager import wrap
from esper_core.seeds.probe import probe_layers
from esper_core.training.data import build_data
from esper_core.training.models import build_model


def device_class(choice: str) -> str:
    """The device class a recipe's ``run.device`` trains on (``auto``: CUDA when present)."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def recipe_targets(loaded: LoadedRecipe) -> list[Target]:
    """Every distinct target of the layers (and span pairs) the recipe's seeds wrap, in model order."""
    recipe = loaded.recipe
    with loaded.located(), loaded.importable():
        data = build_data(recipe.data, recipe.run.seed, loaded.base_dir, recipe.task.kind, recipe.task.target_key)
        with torch.random.fork_rng(devices=[]):
            model = build_model(recipe.model, data.input_shape, data.num_classes)
        manager = wrap(model, config=recipe.seeds)
    shapes = probe_layers(model, list(manager.layers), data.example(2))
    feeders = manager.pair_spans(shapes.order, shapes.inputs, shapes.outputs)
    device, rank = device_class(recipe.run.device), recipe.seeds.rank
    targets = [Target(layer.spec, shapes.inputs[name], rank, "float32", device, "branch")
               for name, layer in manager.layers.items()]
    targets += [Target(replace(manager.layers[feeder].spec, out_features=manager.layers[dest].spec.out_features),
                       shapes.inputs[feeder], rank, "float32", device, "span") for dest, feeder in feeders.items()]
    return list(dict.fromkeys(targets))
