"""From command-line options (and an optional recipe) to what ``esper compile`` should do.

Kept out of the CLI module so the rules are testable without a terminal: the recipe supplies
targets, ``rank``, the device class, the parameter budget (``policy.max_added_params``) and the
store (``<storage.workspace>/kernels``); an explicit option overrides each of them. Finding a recipe's
targets needs its data and model built, which is training's business: the caller passes that
function in (``esper_core.training.targets.recipe_targets``), so the compiler never imports training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from esper_core.compiler.budget import Budget
from esper_core.compiler.kernels import DEVICE_CLASSES, DTYPES
from esper_core.compiler.store import default_store_root
from esper_core.compiler.targets import (COMMAND_LINE, Target, parse_conv1d, parse_conv2d, parse_linear,
                                        with_options)
from esper_core.errors import ConfigError, Problem
from esper_core.recipe.load import LoadedRecipe, load_recipe
from esper_core.recipe.schema import StorageConfig


@dataclass(frozen=True)
class CompilePlan:
    targets: list[Target]
    budget: Budget
    store_root: Path | None
    """``None`` for ``--check``: nothing is read from or written to a store."""
    storage: StorageConfig | None = None
    """Set when no ``--store`` was given: kernels go to the tiered cache of this storage section."""


def plan_compile(*, recipe: str | Path | None = None, linear: Sequence[str] = (), conv2d: Sequence[str] = (),
                 conv1d: Sequence[str] = (), rank: int | None = None, dtype: str | None = None,
                 device: str | None = None, max_params: int | None = None, max_flops: int | None = None,
                 store: str | Path | None = None, check: bool = False, allow_factories: bool | None = None,
                 targets_of: Callable[[LoadedRecipe], list[Target]] | None = None) -> CompilePlan:
    """Raise ``ConfigError`` (exit 2) for anything wrong with the options or the recipe.
    ``targets_of(loaded)`` lists a recipe's targets (required with ``recipe``)."""
    _check_choice("--dtype", dtype, DTYPES)
    _check_choice("--device", device, DEVICE_CLASSES)
    loaded = load_recipe(recipe, allow_factories=allow_factories) if recipe is not None else None
    given = [*(parse_linear(text) for text in linear), *(parse_conv1d(text) for text in conv1d),
             *(parse_conv2d(text) for text in conv2d)]
    if loaded is not None:
        given = [with_options(t, rank=loaded.recipe.seeds.rank) for t in given]
        if targets_of is None:
            raise TypeError("plan_compile(recipe=...) needs targets_of")
        found = targets_of(loaded)
    else:
        found = []
    targets = [with_options(t, rank, dtype, device) for t in [*found, *given]]
    if not targets:
        raise ConfigError(Problem(COMMAND_LINE, "nothing to compile for: give --for RECIPE, --linear IN:OUT, "
                                  "--conv1d IN:OUT:K:S:P[:L] or --conv2d IN:OUT:K:S:P[:HxW]"))
    budget = Budget(max_params, max_flops)
    if max_params is None and loaded is not None:
        budget = Budget(loaded.recipe.policy.max_added_params, max_flops, params_from="policy.max_added_params")
    storage = loaded.recipe.storage if loaded is not None else StorageConfig()
    store_root = None if check else Path(store) if store is not None else default_store_root(storage.workspace)
    tiered = None if check or store is not None else storage
    return CompilePlan(list(dict.fromkeys(targets)), budget, store_root, tiered)


def _check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(Problem(COMMAND_LINE, f"{value!r} is not one of {', '.join(choices)}", field=option))
