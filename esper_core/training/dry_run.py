"""``esper train --dry-run``: everything a run would check and decide before its first step, and nothing more.

It loads and validates the recipe (with overrides), builds the data (for its shapes and split sizes)
and the host model, says which code files the run would bind (each factory module's file and sha256,
which a resume checks: a user sees what the run depends on before it does), wraps the target layers
and probes the shapes they see, and asks the seed catalog which blueprints grow where and what each
would cost (analytic parameters and FLOPs). It does not create the run directory or the workspace,
open the kernel store, compile a kernel or train: a recipe can be checked on a laptop before it is
sent to a GPU. The checks are the trainer's own (one implementation), so a recipe that passes here
fails later only for reasons of that machine (its GPU, its disk) or its data changing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esper_core.growth.catalog import SeedCatalog
from esper_core.recipe.checks import check_device, check_output_dir
from esper_core.recipe.load import load_recipe
from esper_core.telemetry.trackers import check_trackers
from esper_core.training.data import build_data, import_factory
from esper_core.training.early_stop import EarlyStopping
from esper_core.training.factory_sources import ModuleSource, code_modules, module_sources
from esper_core.training.loaders import first_batch
from esper_core.training.models import build_model, count_parameters
from esper_core.training.precision import kernel_dtype
from esper_core.training.setup import seed_everything, select_device
from esper_core.training.tasks import Task


def dry_run(path: str | Path, overrides: Sequence[str] = (), allow_factories: bool | None = None) -> dict[str, Any]:
    """The plan of a run of ``path``: the resolved recipe (YAML), the code it names and what of it the
    run would bind (each module's file and sha256, which a resume checks), the data, the model, each
    wrapped layer with its slots and the blueprints that can (and cannot, and why) grow there, and the
    growth budgets. Raises the errors training would raise for a bad recipe (exit 2)."""
    loaded = load_recipe(path, overrides, allow_factories)
    recipe = loaded.recipe
    base_dir = loaded.base_dir
    check_device(loaded, torch.cuda.is_available())
    check_output_dir(loaded)
    device = select_device(recipe.run.device)
    seed_everything(recipe.run.seed, False, torch.device("cpu"))  # the host's initial weights, as training draws them
    with loaded.located(), loaded.importable():
        check_trackers(recipe.telemetry)
        function = import_factory(recipe.task.function, "task.function") if recipe.task.function else None
        task = Task(recipe.task, function)
        EarlyStopping(recipe.trainer.early_stopping, task.kind, task.metric)  # its metric must fit the task
        data = build_data(recipe.data, recipe.run.seed, base_dir, recipe.task.kind, recipe.task.target_key)
        model = build_model(recipe.model, data.input_shape, data.num_classes)
        # on the device training would use (a model may run only there), on a copy: the plan stays on the CPU
        task.check_fit(model if device.type == "cpu" else copy.deepcopy(model).to(device), first_batch(data.train, 2))
        params = count_parameters(model)
        manager, catalog = SeedCatalog.of_model(model, recipe.seeds, data.example(2),
                                                [base_dir / d for d in recipe.seeds.blueprint_dirs], device.type,
                                                kernel_dtype(recipe.trainer.precision))
    sources = module_sources(loaded)  # as the run records them: the files the imports above read
    code = {module: _bound(field, sources.get(module), base_dir) for module, field in code_modules(loaded).items()}
    layers = []
    for name, layer in manager.layers.items():
        usable = [bp for bp in catalog.blueprints_for(name) if catalog.over_budget(bp, name, recipe.policy) is None]
        layers.append({
            "layer": name, "host": layer.spec.kind, "in": layer.spec.in_features, "out": layer.spec.out_features,
            "input_shape": list(catalog.input_shapes[name]), "slots": len(layer.slots),
            "blueprints": [{"name": bp, "params": catalog.cost(bp, name).params,
                            "flops": catalog.cost(bp, name).flops, "reads": catalog.source(bp, name) or name}
                           for bp in usable],
            "unusable": {bp: catalog.unusable(bp, name) or catalog.over_budget(bp, name, recipe.policy)
                         for bp in catalog.names if bp not in usable},
        })
    policy, trainer = recipe.policy, recipe.trainer
    samples_per_step = recipe.data.batch_size * trainer.accumulate_steps
    train_size = len(data.train) if hasattr(data.train, "__len__") else None  # type: ignore[arg-type]
    return {
        "recipe": str(loaded.path), "recipe_sha256": loaded.sha256, "resolved": loaded.resolved_yaml,
        "run_dir": str(Path(recipe.run.output_dir).resolve() / recipe.run.name), "device": str(device),
        "code": code,
        "task": {"kind": task.kind, "metric": task.metric, "higher_is_better": task.higher_is_better},
        "data": {"source": data.name, "input_shape": list(data.input_shape), "outputs": data.num_classes,
                 "train": train_size, "val": _size(data.val), "test": _size(data.test),
                 "samples_per_step": samples_per_step,
                 "steps_per_epoch": max(1, train_size // samples_per_step) if train_size else None},
        "model": {"arch": recipe.model.arch, "params": params},
        "layers": layers,
        "kernels": len({spec.address() for spec in catalog.affordable_specs(policy).values()})
        if policy.max_seeds else 0,
        "budgets": {"max_seeds": policy.max_seeds, "max_germinations": policy.max_germinations,
                    "max_added_params": policy.max_added_params, "max_added_flops": policy.max_added_flops,
                    "max_latency_ms": policy.max_latency_ms,
                    "growth_window_steps": [int(policy.growth_window[0] * trainer.max_steps),
                                            int(policy.growth_window[1] * trainer.max_steps)]},
    }


def _bound(field: str, source: ModuleSource | None, base_dir: Path) -> dict[str, str | None]:
    """One module of the plan's ``code``: the recipe field naming it, its file (absolute, as the run
    records it, and as shown to a user) and sha256; ``None`` for each where the run does not bind it
    (a module of the standard library or an installed package, or one without a source file)."""
    return {"field": field, "file": source.file if source else None,
            "path": source.shown(base_dir) if source else None, "sha256": source.sha256 if source else None}


def _size(dataset: Any) -> int | None:
    return len(dataset) if hasattr(dataset, "__len__") else None
