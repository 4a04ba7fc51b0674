"""Seed execution: the only code that adds seed modules to the model and parameter groups to the
optimizer, or takes them away.

The policy decides and the lifecycle clock (:class:`SeedManager`) counts; this module carries out what
they say on the two objects that must stay consistent with each other: the model's seed modules and
the optimizer's seed group (one group, its parameters appended seed by seed in a recorded order of
slot keys). A germinated seed waits for its kernel without
blocking anything; :meth:`SeedExecutor.activate_ready` starts incubation for those whose kernel
arrived, with fresh initial weights drawn from (run seed, step, layer, slot). Rebuilding a recorded topology (resume, rollback) goes through here too, so a restored run's
optimizer holds exactly the parameters, in exactly the order, the recorded run had.

The optimizer may be bound late (frameworks such as Lightning create it after the model is set up
and restored): until :meth:`SeedExecutor.bind` the seed group is only an ordered record of members.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esper_core.blueprints.builder import build_seeded
from esper_core.growth import optimizer as optim
from esper_core.seeds.merge import linear_delta, merge_into
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
    """``seed_lr(step)`` is the seed group's learning rate at optimizer step ``step``."""

    def __init__(self, manager: SeedManager, optimizer: torch.optim.Optimizer | None, catalog: SeedCatalog,
                 kernels: KernelSupply, seed_lr: Callable[[int], float], run_seed: int = 0,
                 merge_linear: bool = True) -> None:
        self.manager = manager
        self.run_seed = run_seed
        self.merge_linear = merge_linear
        self.optimizer = optimizer
        self.catalog = catalog
        self.kernels = kernels
        self.seed_lr = seed_lr
        # the seed group's members by slot key, in optimizer order (kept while unbound too)
        self._members: dict[str, list[torch.nn.Parameter]] = {}

    def bind(self, optimizer: torch.optim.Optimizer, grows: bool = True) -> None:
        """Adopt the optimizer: seed parameters it already holds in other groups (a framework built it
        from all of the model's parameters) move to the seed group, in the recorded order. A run that
        can never grow (``grows`` false, no seed) gets no seed group: an empty group still costs the
        optimizer its per-group work every step (about 30 us on the CPU, 3% of the quickstart MLP's step)."""
        seed_params = {id(p) for params in self._members.values() for p in params}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in seed_params]
        self.optimizer = optimizer
        lr = self.seed_lr(self.manager.step_count)
        if grows or self._members:
            optim.ensure_seed_group(optimizer, lr)  # from now on the number of groups never changes
        for params in self._members.values():
            optim.add_params(optimizer, params, lr)

    def _params(self, key: str) -> list[torch.nn.Parameter]:
        layer, _, index = key.rpartition("#")
        return self.manager.seed_parameters(SlotRef(layer, int(index)))

    def _add(self, key: str) -> None:
        self._members[key] = params = self._params(key)
        if self.optimizer is not None:
            optim.add_params(self.optimizer, params, self.seed_lr(self.manager.step_count))

    def _drop(self, key: str) -> None:
        params = self._members.pop(key)
        if self.optimizer is not None:
            optim.remove_params(self.optimizer, params)

    def germinate(self, decision: GrowthDecision) -> Event:
        spec = self.catalog.spec(decision.blueprint, decision.slot.layer)
        self.kernels.request(spec)
        event = self.manager.germinate(decision.slot, decision.blueprint, spec.address(), spec.resolve().params,
                                       spec.to_json(), self.catalog.source(decision.blueprint, decision.slot.layer))
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
            fresh = build_seeded(future.result().spec.resolve(), self._init_seed(ref))
            seed.load_state_dict(fresh.state_dict())
            events.append(self.manager.start_incubation(ref, seed))
            self._add(ref.key)
        return events, failures

    def remove(self, ref: SlotRef, rolled_back: bool, **evidence: Any) -> Event:
        """Cull (or roll back) a seed: out of the model, out of the optimizer, slot embargoed."""
        had_module = str(ref.index) in self.manager.layers[ref.layer].seeds  # a GERMINATED seed has none yet
        event, _ = self.manager.cull(ref, rolled_back=rolled_back, **evidence)
        if had_module:
            self._drop(ref.key)
        return event

    def fossilize(self, ref: SlotRef, **evidence: Any) -> Event:
        """Keep the seed; a branch that is an exact linear map of its host's input (a low-rank adapter
        on a Linear host adds no expressivity) is folded into the host's weight and its module and
        parameters leave the optimizer: it then costs no parameter and no FLOP."""
        layer = self.manager.layers[ref.layer]
        slot, seed = layer.slots[ref.index], layer.seed_module(ref.index)
        alpha = float(layer.alpha[ref.index])
        mergeable = self.merge_linear and slot.source is None and linear_delta(seed, layer.spec) is not None
        event = self.manager.fossilize(ref, **evidence)
        bias_before = getattr(layer.host, "bias", None)
        if mergeable and merge_into(layer.host, seed, alpha):  # else it stays a branch, never dropped unmerged
            layer.release_merged(ref.index)
            self._drop(ref.key)
            if bias_before is None and getattr(layer.host, "bias", None) is not None:  # the fold created one
                self._adopt_host_parameter(layer.host.weight, layer.host.bias)
            event["merged_into_host"] = True
        return event

    def _adopt_host_parameter(self, sibling: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
        """A parameter the host gained (a bias created by a merge) joins the group of its weight, right
        after it: the group's order then depends on the model alone, not on when seeds merged, so a
        resume that recreates the bias before the first step puts it where the checkpoint has it."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            at = next((i for i, p in enumerate(group["params"]) if p is sibling), None)
            if at is not None:
                group["params"].insert(at + 1, new)
                return

    def set_lr(self, step: int) -> None:
        """The seed group's learning rate for optimizer step ``step``."""
        group = optim.seed_group(self.optimizer) if self.optimizer is not None else None
        if group is not None:
            group["lr"] = self.seed_lr(step)

    def group_order(self) -> list[str]:
        """The slot keys of the seed group's members in optimizer order (a restore re-adds them in
        this order, so the optimizer's parameter list is what the recorded run's was)."""
        return list(self._members)

    def rebuild(self, topology: dict[str, Any], group_order: list[str]) -> None:
        """Make the model's seeds and the optimizer's seed group what ``topology`` recorded (weights
        and optimizer state are loaded afterwards by the caller). Builds each seed from its kernel,
        waiting for a compile if the store lacks it."""
        for name in self.group_order():
            self._drop(name)
        biased = {name for name, layer in self.manager.layers.items() if getattr(layer.host, "bias", None) is not None}
        holding = self.manager.restore(topology, self._build)
        for name, layer in self.manager.layers.items():  # a bias a merge gave the host (see fossilize)
            if name not in biased and getattr(layer.host, "bias", None) is not None:
                self._adopt_host_parameter(layer.host.weight, layer.host.bias)
        if sorted(group_order) != sorted(ref.key for ref in holding):
            raise ValueError(f"recorded optimizer seed group members {group_order} do not match the seeds "
                             f"the topology holds {sorted(ref.key for ref in holding)}")
        for name in group_order:
            self._add(name)

    def _build(self, layer: str, blueprint: str) -> torch.nn.Module:
        return self.kernels.build(self.catalog.spec(blueprint, layer), *self._placement(SlotRef(layer, 0)),
                                  waited=self.manager.step_count > 0)

    def _init_seed(self, ref: SlotRef) -> int:
        """The seed of a germination's initial weights: a function of (run seed, step, layer, slot), so
        two seeds are never copies of each other and a rerun draws the same weights."""
        key = f"{self.run_seed}:{self.manager.step_count}:{ref.layer}:{ref.index}".encode()
        return int(hashlib.sha256(key).hexdigest()[:15], 16)

    def _placement(self, ref: SlotRef) -> tuple[torch.device, torch.dtype]:
        reference = next(self.manager.layers[ref.layer].host.parameters())
        return reference.device, reference.dtype
