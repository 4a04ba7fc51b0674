"""Esper: morphogenetic training for PyTorch.

Two front doors to one growth engine: :class:`GrowthController` grows a model inside the user's own
training loop (with :func:`save_checkpoint`/:func:`load_checkpoint` for its state), and
``Trainer.from_recipe(path, overrides).fit()`` is ``esper train``; ``load_run(RUN_DIR)`` gives a trained
model back (``load_grown(path, model=...)`` one the user's loop grew) and ``unwrap(model)`` makes it a
plain module (seeds merged where exact). Names are imported
on first use, so ``import esper_core.errors`` (or the CLI's ``--help``) does not pay for PyTorch.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

_EXPORTS = {
    # The errors the API raises, so a user's loop can catch them as docs/api.md names them
    # (``except esper_core.CheckpointError``) without knowing the module that defines them.
    "CheckpointError": "esper_core.errors",
    "ConfigError": "esper_core.errors",
    "EsperError": "esper_core.errors",
    "Evaluation": "esper_core.growth.evaluation",
    "GrowthController": "esper_core.growth.controller",
    "StepOutcome": "esper_core.growth.controller",
    "load_checkpoint": "esper_core.growth.checkpoint",
    "save_checkpoint": "esper_core.growth.checkpoint",
    "Task": "esper_core.training.tasks",
    "KasminaLayer": "esper_core.seeds.kasmina",
    "LoadedRecipe": "esper_core.recipe",
    "load_grown": "esper_core.export.grown",
    "load_run": "esper_core.export.load",
    "unwrap": "esper_core.export.plain",
    "Recipe": "esper_core.recipe",
    "load_recipe": "esper_core.recipe",
    "SeedManager": "esper_core.seeds.manager",
    "wrap": "esper_core.seeds.manager",
    "SeedState": "esper_core.seeds.lifecycle",
    "Trainer": "esper_core.training.trainer",
}
__all__ = sorted(_EXPORTS)

DISTRIBUTION = "esper-morph"
"""The name on the package index (``pip install esper-morph``): ``esper`` there is another project.
The import packages (``esper_core``, ``esper_cli``) and the ``esper`` command keep their names."""

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'esper_core' has no attribute {name!r}")
