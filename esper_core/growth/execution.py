"""Seed execution: the only code that adds seed modules to the model and parameter groups to the
optimizer, or takes them away.

The policy decides and the lifecycle clock (:class:`SeedManager`) counts; this module carries out what
they say on the two objects that must stay consistent with each other: the model's seed modules and
the optimizer's seed groups (named by slot key). A germinated seed waits for its kernel without
blocking anything; :meth:`SeedExecutor.activate_ready` starts incubation for those whose kernel
arrived. Rebuilding a recorded topology (resume, rollback) goes through here too, so a restored run's
optimizer has exactly the groups, in exactly the order, the recorded run had.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esper_core.growth import optimizer as optim
from esper_core.growth.catalog import SeedCatalog
from esper_core.growth.kernels import KernelSupply
from esper_core.policy.growth import GrowthDecision
from esper_core.seeds.manager import Event, SeedManager, SlotRef


@dataclass(frozen=True)
class KernelFailure:
    """A germinated seed whose kernel could not be compiled."""

    layer: str
    blueprint: str
    error: BaseException


class SeedExecutor:
    """``seed_lr(step)`` is the learning rate of every seed group at optimizer step ``step``."""

    def __init__(self, manager: SeedManager, optimizer: torch.optim.Optimizer, catalog: SeedCatalog,
                 kernels: KernelSupply, seed_lr: Callable[[int], float]) -> None:
        self.manager = manager
        self.optimizer = optimizer
        self.catalog = catalog
        self.kernels = kernels
        self.seed_lr = seed_lr

    def germinate(self, decision: GrowthDecision) -> Event:
        spec = self.catalog.spec(decision.blueprint, decision.slot.layer)
        self.kernels.request(spec)
        event = self.manager.germinate(decision.slot, decision.blueprint, spec.address(), spec.resolve().params,
                                       spec.to_json())
        return event | {"reason": decision.reason, "merit": decision.merit, "kernel": spec.address(),
                        "inputs": decision.inputs}

    def activate_ready(self) -> tuple[list[Event], list[KernelFailure]]:
        """Start incubation for every germinated seed whose kernel has arrived; never waits. A seed
        whose kernel failed is culled and its failure returned (the policy must stop choosing it)."""
        events: list[Event] = []
        failures: list[KernelFailure] = []
        for ref in self.manager.pending():
            slot = self.manager.layers[ref.layer].slots[ref.index]
            assert slot.blueprint is not None
            future = self.kernels.poll(self.catalog.spec(slot.blueprint, ref.layer))
            if future is None:
                continue
            error = future.exception()
            if error is not None:
                failures.append(KernelFailure(ref.layer, slot.blueprint, error))
                events.append(self.remove(ref, rolled_back=False, reason="its kernel failed to compile"))
                continue
            seed = future.result().instantiate(*self._placement(ref))
            events.append(self.manager.start_incubation(ref, seed))
            optim.add_group(self.optimizer, ref.key, self.manager.seed_parameters(ref), self.seed_lr(self.manager.step_count))
        return events, failures

    def remove(self, ref: SlotRef, rolled_back: bool, **evidence: Any) -> Event:
        """Cull (or roll back) a seed: out of the model, out of the optimizer, slot embargoed."""
        had_module = str(ref.index) in self.manager.layers[ref.layer].seeds  # a GERMINATED seed has none yet
        event, _ = self.manager.cull(ref, rolled_back=rolled_back, **evidence)
        if had_module:
            optim.remove_group(self.optimizer, ref.key)
        return event

    def fossilize(self, ref: SlotRef, **evidence: Any) -> Event:
        return self.manager.fossilize(ref, **evidence)

    def set_lr(self, step: int) -> None:
        """Every seed group's learning rate for optimizer step ``step``."""
        lr = self.seed_lr(step)
        for group in optim.seed_groups(self.optimizer):
            group["lr"] = lr

    def group_order(self) -> list[str]:
        """Seed groups' names in optimizer order (a restore re-adds them in this order)."""
        return [str(g["name"]) for g in optim.seed_groups(self.optimizer)]

    def rebuild(self, topology: dict[str, Any], group_order: list[str]) -> None:
        """Make the model's seeds and the optimizer's seed groups what ``topology`` recorded (weights
        and optimizer state are loaded afterwards by the caller). Builds each seed from its kernel,
        waiting for a compile if the store lacks it."""
        for name in self.group_order():
            optim.remove_group(self.optimizer, name)
        holding = self.manager.restore(topology, self._build)
        refs = {ref.key: ref for ref in holding}
        if sorted(group_order) != sorted(refs):
            raise ValueError(f"recorded optimizer seed groups {group_order} do not match the seeds "
                             f"the topology holds {sorted(refs)}")
        for name in group_order:
            optim.add_group(self.optimizer, name, self.manager.seed_parameters(refs[name]),
                            self.seed_lr(self.manager.step_count))

    def _build(self, layer: str, blueprint: str) -> torch.nn.Module:
        return self.kernels.build(self.catalog.spec(blueprint, layer), *self._placement(SlotRef(layer, 0)),
                                  waited=self.manager.step_count > 0)

    def _placement(self, ref: SlotRef) -> tuple[torch.device, torch.dtype]:
        reference = next(self.manager.layers[ref.layer].host.parameters())
        return reference.device, reference.dtype
