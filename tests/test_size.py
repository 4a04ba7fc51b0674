"""The parameter count a run logs is counted again whenever seeds change the model (and only then)."""

from __future__ import annotations

import torch
from torch import nn

from esper_core import SeedState, wrap
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.seeds.manager import SeedManager, SlotRef
from esper_core.seeds.merge import merge_into
from esper_core.training.models import count_parameters
from esper_core.training.size import ParameterCount

LIBRARY = BlueprintLibrary.discover()


def _seed(manager: SeedManager, layer: str) -> nn.Module:
    module, _ = build_kernel(KernelSpec(LIBRARY.get("lowrank_adapter").blueprint, manager.layers[layer].spec, 4))
    return module


def _incubate(manager: SeedManager, ref: SlotRef) -> None:
    manager.germinate(ref, "lowrank_adapter", "test", 0)
    manager.start_incubation(ref, _seed(manager, ref.layer))


def _naive_counts(manager: SeedManager) -> dict[str, int]:
    counts = {state.name.lower(): 0 for state in SeedState}
    for layer in manager.layers.values():
        for slot in layer.slots:
            counts[slot.state.name.lower()] += 1
    return counts


def test_the_parameter_count_follows_germination_cull_merge_and_restore() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    manager = wrap(model, targets=["0", "2"], per_layer=2)
    count = ParameterCount(model, manager)
    seen = []

    def check() -> None:
        assert count() == count_parameters(model)
        assert manager.counts() == _naive_counts(manager)
        seen.append(count())

    check()
    first, second = SlotRef("2", 0), SlotRef("0", 1)
    _incubate(manager, first)
    check()
    _incubate(manager, second)
    check()
    recorded = manager.topology()  # both seeds live
    _, removed = manager.cull(first)
    assert removed
    check()
    layer = manager.layers["0"]  # the other seed is kept and folded into its host: its module leaves
    layer.start_blending(1)
    layer.start_probation(1)
    manager.fossilize(second)
    check()
    assert merge_into(layer.host, layer.seed_module(1), 1.0)
    layer.release_merged(1)
    check()
    manager.restore(recorded, lambda name, blueprint: _seed(manager, name))  # a rollback's topology
    check()
    assert seen[1] > seen[0] and seen[2] > seen[1] and seen[3] < seen[2] and seen[5] < seen[4] and seen[6] == seen[2]


def test_the_count_is_not_taken_again_while_the_seeds_stay_as_they_are() -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    manager = wrap(model, targets=["2"])
    count = ParameterCount(model, manager)
    assert count() == count_parameters(model)
    model.add_module("extra", nn.Linear(3, 3))  # not a change any run makes: shows the count is kept
    assert count() == count_parameters(model) - 12
    _incubate(manager, SlotRef("2", 0))
    assert count() == count_parameters(model)
