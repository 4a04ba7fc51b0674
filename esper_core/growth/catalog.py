"""What may grow where: the allowed blueprints per host kind, and each (blueprint, layer) as a kernel spec.

The catalog is the growth engine's view of the blueprint library. It answers, for one wrapped model:
which blueprints grow on a layer, the exact kernel (:class:`KernelSpec`) a blueprint becomes on that
layer (host geometry, the input shape the layer really sees, dtype, device class), and what the seed
would cost. Problems are reported against the recipe fields that caused them (``seeds.blueprints.N``).
"""

from __future__ import annotations

from collections.abc import Sequence

from esper_core.blueprints.builder import ResolveError
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.flops import analytic_cost
from esper_core.compiler.kernels import KernelSpec
from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.policy.growth import SeedCost
from esper_core.seeds.kasmina import KasminaLayer


class SeedCatalog:
    def __init__(self, library: BlueprintLibrary, names: Sequence[str], layers: dict[str, KasminaLayer],
                 input_shapes: dict[str, tuple[int, ...]], rank: int, device_class: str) -> None:
        self.library = library
        self.names = list(names)
        self.layers = layers
        self.input_shapes = input_shapes
        self.rank = rank
        self.device_class = device_class
        self._costs: dict[tuple[str, str], SeedCost] = {}

    def check(self) -> None:
        """Every named blueprint must exist and build on at least one wrapped layer, before step 1."""
        problems = []
        kinds = {layer.spec.kind for layer in self.layers.values()}
        for i, name in enumerate(self.names):
            field = f"seeds.blueprints.{i}"
            if name not in self.library.files:
                problems.append(Problem(RECIPE_FIELD, f"unknown blueprint {name!r} (known: "
                                        f"{', '.join(self.library.names())})", field=field))
            elif self.library.get(name).blueprint.host not in kinds:
                problems.append(Problem(RECIPE_FIELD, f"blueprint {name!r} grows on "
                                        f"{self.library.get(name).blueprint.host} layers but the targets wrap only "
                                        f"{', '.join(sorted(kinds))} layers", field=field))
        if problems:
            raise ConfigError(problems)
        for layer_name, layer in self.layers.items():
            for name in self.blueprints_for(layer.spec.kind):
                try:
                    self.spec(name, layer_name).resolve()
                except ResolveError as exc:
                    raise ConfigError(self.library.get(name).problem(exc)) from None

    def blueprints_for(self, kind: str) -> list[str]:
        """The allowed blueprints that grow on ``kind`` hosts, in the recipe's preference order."""
        return [n for n in self.names if n in self.library.files and self.library.get(n).blueprint.host == kind]

    def spec(self, blueprint: str, layer: str) -> KernelSpec:
        host = self.layers[layer].host
        dtype = str(next(host.parameters()).dtype).removeprefix("torch.")
        return KernelSpec(self.library.get(blueprint).blueprint, self.layers[layer].spec, self.rank, dtype,
                          self.device_class, self.input_shapes[layer])

    def every_spec(self) -> dict[tuple[str, str], KernelSpec]:
        """(layer, blueprint) -> spec for every seed this model can grow."""
        return {(layer, bp): self.spec(bp, layer)
                for layer, kasmina in self.layers.items() for bp in self.blueprints_for(kasmina.spec.kind)}

    def cost(self, blueprint: str, layer: str) -> SeedCost:
        """Parameters and analytic forward FLOPs per sample of ``blueprint`` on ``layer``."""
        key = (blueprint, layer)
        if key not in self._costs:
            spec = self.spec(blueprint, layer)
            cost = analytic_cost(spec.resolve(), spec.sample_shape)
            self._costs[key] = SeedCost(cost.params, cost.forward)
        return self._costs[key]
