"""What may grow where: the allowed blueprints per layer, and each (blueprint, layer) as a kernel spec.

The catalog is the growth engine's view of the blueprint library. It answers, for one wrapped model:
which blueprints grow on a layer (its host kind; span blueprints only where the layer has a feeder,
the wrapped layer before it), the exact kernel (:class:`KernelSpec`) a blueprint becomes there (host
geometry, the input shape the seed really reads, dtype, device class), and what the seed would cost.
A span seed on layer l+1 is a branch from l's input to l+1's output: its kernel's host is l's kind
and geometry with l's input size and l+1's output size. Problems are reported against the recipe
fields that caused them (``seeds.blueprints.N``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from esper_core.blueprints.builder import ResolveError
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.flops import analytic_cost
from esper_core.compiler.kernels import KernelSpec
from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.policy.growth import SeedCost
from esper_core.recipe.schema import PolicyConfig, SeedsConfig
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.manager import SeedManager, wrap
from esper_core.seeds.probe import probe_layers


class SeedCatalog:
    @classmethod
    def of_model(cls, model: nn.Module, config: SeedsConfig, example: Any, blueprint_dirs: Sequence[Path],
                 device_class: str, kernel_dtype: str | None = None) -> tuple[SeedManager, SeedCatalog]:
        """Wrap ``model``'s target layers, learn the shapes they see from one ``example`` input, and
        check that every named blueprint grows somewhere (the growth controller's setup, and what
        ``esper train --dry-run`` shows). Refused, the model is left unwrapped."""
        manager = wrap(model, config=config)
        with manager.unwrapped_on_failure():
            shapes = probe_layers(model, list(manager.layers), example)
            misfits = [Problem(RECIPE_FIELD, f"layer {name}: {why}: the example must be a batch of inputs as the "
                               "training loop passes them (e.g. x[:2], not x[0])", field="example")
                       for name in shapes.order
                       if (why := manager.layers[name].spec.sample_problem(shapes.inputs[name])) is not None]
            if misfits:
                raise ConfigError(misfits)
            feeders = manager.pair_spans(shapes.order, shapes.inputs, shapes.outputs)
            catalog = cls(BlueprintLibrary.discover(blueprint_dirs), config.blueprints, manager.layers, feeders,
                          shapes.inputs, config.rank, device_class, kernel_dtype)
            catalog.check()
        return manager, catalog

    def __init__(self, library: BlueprintLibrary, names: Sequence[str], layers: dict[str, KasminaLayer],
                 feeders: dict[str, str], input_shapes: dict[str, tuple[int, ...]], rank: int,
                 device_class: str, kernel_dtype: str | None = None) -> None:
        self.library = library
        self.names = list(names)
        self.layers = layers
        self.feeders = feeders
        self.input_shapes = input_shapes
        self.rank = rank
        self.device_class = device_class
        self.kernel_dtype = kernel_dtype  # the autocast precision seeds run in, when not the host's
        self._costs: dict[tuple[str, str], SeedCost] = {}

    def is_span(self, blueprint: str) -> bool:
        return self.library.get(blueprint).blueprint.kind == "span"

    def check(self) -> None:
        """Every named blueprint must exist and build on at least one wrapped layer, before step 1."""
        problems = []
        for i, name in enumerate(self.names):
            field = f"seeds.blueprints.{i}"
            if name not in self.library.files:
                problems.append(Problem(RECIPE_FIELD, f"unknown blueprint {name!r} (known: "
                                        f"{', '.join(self.library.names())})", field=field))
            elif not any(name in self.blueprints_for(layer) for layer in self.layers):
                blueprint = self.library.get(name).blueprint
                kinds = ", ".join(sorted({layer.spec.kind for layer in self.layers.values()}))
                where = (f"a pair of consecutive {blueprint.host} layers (the targets wrap "
                         f"{', '.join(self.layers)}; pairs found: {self._pairs() or 'none'})"
                         if blueprint.kind == "span" else f"{blueprint.host} layers but the targets wrap only {kinds} layers")
                problems.append(Problem(RECIPE_FIELD, f"blueprint {name!r} grows on {where}", field=field))
        if problems:
            raise ConfigError(problems)
        for layer in self.layers:
            for name in self.blueprints_for(layer):
                try:
                    self.spec(name, layer).resolve()
                except ResolveError as exc:
                    raise ConfigError(self.library.get(name).problem(exc)) from None

    def _pairs(self) -> str:
        return ", ".join(f"{feeder} -> {dest}" for dest, feeder in self.feeders.items())

    def blueprints_for(self, layer: str) -> list[str]:
        """The allowed blueprints that grow on ``layer``, in the recipe's preference order."""
        return [name for name in self.names if name in self.library.files and self.unusable(name, layer) is None]

    def unusable(self, blueprint: str, layer: str) -> str | None:
        """Why ``blueprint`` (a library name) cannot grow on ``layer``, or ``None`` when it can."""
        kind = self.layers[layer].spec.kind
        ir = self.library.get(blueprint).blueprint
        if ir.kind != "span":
            return None if ir.host == kind else f"grows on {ir.host} layers, this one is {kind}"
        feeder = self.feeders.get(layer)
        if feeder is None:
            return "a span seed needs the wrapped layer before this one as its feeder, and there is none"
        if ir.host != self.layers[feeder].spec.kind:
            return f"spans {ir.host} layers, the feeder {feeder} is {self.layers[feeder].spec.kind}"
        if not self._span_fits(layer):
            return "this layer changes the grid, which a span seed keeps"
        return None

    def _span_fits(self, layer: str) -> bool:
        """A conv span keeps the feeder's geometry, so the layer it adds to must keep the grid."""
        dest = self.layers[layer].spec
        if dest.kind == "linear":
            return True
        grid = self.input_shapes[layer][1:]
        return dest.output_size(*grid) == tuple(grid)

    def source(self, blueprint: str, layer: str) -> str | None:
        """The feeder a seed of ``blueprint`` on ``layer`` reads from (``None`` for a branch)."""
        return self.feeders[layer] if self.is_span(blueprint) else None

    def spec(self, blueprint: str, layer: str) -> KernelSpec:
        dest = self.layers[layer]
        dtype = self.kernel_dtype or str(next(dest.host.parameters()).dtype).removeprefix("torch.")
        source = self.source(blueprint, layer)
        if source is None:
            host, shape = dest.spec, self.input_shapes[layer]
        else:
            host = self.layers[source].spec.spanning(dest.spec)
            shape = self.input_shapes[source]
        return KernelSpec(self.library.get(blueprint).blueprint, host, self.rank, dtype, self.device_class, shape)

    def every_spec(self) -> dict[tuple[str, str], KernelSpec]:
        """(layer, blueprint) -> spec for every seed this model can grow."""
        return {(layer, bp): self.spec(bp, layer) for layer in self.layers for bp in self.blueprints_for(layer)}

    def over_budget(self, blueprint: str, layer: str, policy: PolicyConfig) -> str | None:
        """Why one seed of ``blueprint`` on ``layer`` would on its own exceed the growth budgets
        (``policy.max_added_params``, ``max_added_flops``), or ``None``. Such a seed can never be chosen,
        so its kernel is not worth compiling: a run would otherwise wait for a kernel it cannot use."""
        cost = self.cost(blueprint, layer)
        if cost.params > policy.max_added_params:
            return (f"one seed adds {cost.params:,} parameters, more than policy.max_added_params "
                    f"({policy.max_added_params:,})")
        if policy.max_added_flops is not None and cost.flops > policy.max_added_flops:
            return (f"one seed adds {cost.flops:,} forward FLOPs per sample, more than policy.max_added_flops "
                    f"({policy.max_added_flops:,})")
        return None

    def affordable_specs(self, policy: PolicyConfig) -> dict[tuple[str, str], KernelSpec]:
        """:meth:`every_spec` without the seeds no budget could ever admit (see :meth:`over_budget`)."""
        return {(layer, bp): spec for (layer, bp), spec in self.every_spec().items()
                if self.over_budget(bp, layer, policy) is None}

    def cost(self, blueprint: str, layer: str) -> SeedCost:
        """Parameters and analytic forward FLOPs per sample of ``blueprint`` on ``layer``."""
        key = (blueprint, layer)
        if key not in self._costs:
            spec = self.spec(blueprint, layer)
            cost = analytic_cost(spec.resolve(), spec.sample_shape)
            self._costs[key] = SeedCost(cost.params, cost.forward)
        return self._costs[key]
