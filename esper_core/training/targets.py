"""The kernel targets of a recipe: every distinct wrapped layer with the input it really sees.

Used by ``esper compile --for RECIPE`` so CI can compile ahead of time exactly the kernels a run
will ask for. It builds the recipe's data and model (a throwaway copy; the global RNG is left as it
was) and probes the layer inputs with a real batch, as the growth controller does.
"""

from __future__ import annotations

import torch

from esper_core.blueprints.host import HostSpec
from esper_core.compiler.targets import Target
from esper_core.errors import RECIPE_FIELD, ConfigError
from esper_core.recipe.load import LoadedRecipe
from esper_core.seeds.probe import input_shapes
from esper_core.seeds.targets import TargetMismatch, match_targets
from esper_core.training.data import build_data
from esper_core.training.models import build_model


def device_class(choice: str) -> str:
    """The device class a recipe's ``run.device`` trains on (``auto``: CUDA when present)."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def recipe_targets(loaded: LoadedRecipe) -> list[Target]:
    """Every distinct target of the layers the recipe's seeds wrap, in model order."""
    recipe = loaded.recipe
    try:
        data = build_data(recipe.data, recipe.run.seed, loaded.path.parent)
        with torch.random.fork_rng(devices=[]):
            model = build_model(recipe.model, data.input_shape, data.num_classes)
        names = match_targets(model, recipe.seeds.targets, recipe.seeds.exclude)
    except ConfigError as exc:
        raise ConfigError([loaded.locate(p.field, p.message) if p.source == RECIPE_FIELD and p.field else p
                           for p in exc.problems]) from None
    except TargetMismatch as exc:
        raise ConfigError(loaded.locate(f"seeds.{exc.which}.{exc.index}", exc.message)) from None
    shapes = input_shapes(model, names, data.example(2))
    device = device_class(recipe.run.device)
    targets = (Target(HostSpec.of(model.get_submodule(name)), shapes[name], recipe.seeds.rank, "float32", device)
               for name in names)
    return list(dict.fromkeys(targets))
