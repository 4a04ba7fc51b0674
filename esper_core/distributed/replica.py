"""The DDP wrapper of a model that grows: rebuilt at the step its set of parameters changes.

DDP fixes its gradient buckets when it is built, from the parameters the module has then; a seed
that starts incubating (or is culled, merged or rolled back) changes that set. Rather than
``find_unused_parameters`` (a graph traversal after every forward, for the whole run) the wrapper is
rebuilt at the step of a change, which every rank reaches at the same step because every rank makes
the same decisions (:mod:`esper_core.distributed`). Before rebuilding, the ranks compare a digest of
their seed topologies: a divergence stops the run with a clear error instead of averaging gradients
of different models. The old wrapper's autograd hooks are removed first, so a host parameter never
reports its gradient to two reducers.

The forward pass runs ``step_module``: the model itself, or its ``torch.compile``'d form. Wrapping the
compiled module (rather than compiling the wrapper) keeps a rebuild free of recompilation: the seed
path already runs eagerly between compiled host regions (:mod:`esper_core.seeds.kasmina`). In a model
that loops over its blocks dynamo then compiles only the frames below the loop (the top frame runs
eagerly), so a compiled DDP run gains less than a compiled single-device one.

What a rebuild costs is measured (``stall_s``, the total; ``rebuilds``); ``benchmarks/distributed.py``
reports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esper_core.distributed.world import World


class Replica:
    """``module()`` is what a training step calls; see the module docstring. ``topology()`` returns
    the seed topology (JSON) the ranks compare before each rebuild."""

    def __init__(self, model: nn.Module, step_module: nn.Module, world: World,
                 topology: Callable[[], dict[str, Any]]) -> None:
        self.model = model
        self.step_module = step_module
        self.world = world
        self.topology = topology
        self.rebuilds = 0
        self.stall_s = 0.0
        self._signature: tuple[int, ...] | None = None
        self._wrapper: DistributedDataParallel | None = None

    def module(self) -> DistributedDataParallel:
        """The current wrapper, rebuilt first when the model's parameters changed. The wrapper holds
        every parameter it was built with, so a removed parameter's id cannot be reused by a new one
        before the comparison sees it."""
        signature = tuple(id(p) for p in self.model.parameters())
        if signature != self._signature or self._wrapper is None:
            self._rebuild(signature)
        assert self._wrapper is not None
        return self._wrapper

    def _rebuild(self, signature: tuple[int, ...]) -> None:
        began = time.perf_counter()
        topology = self.topology()
        self.world.check_same(json.dumps(topology, sort_keys=True), f"the seed topology at step {topology.get('step')}")
        if self._wrapper is not None:
            self._wrapper._remove_autograd_hooks()
            self._wrapper = None
        cuda = self.world.device.type == "cuda"
        self._wrapper = DistributedDataParallel(self.step_module, device_ids=[self.world.local_rank] if cuda else None)
        self._signature = signature
        if self.rebuilds:  # the first build is set-up, not a stall of training
            self.stall_s += time.perf_counter() - began
        self.rebuilds += 1

    def close(self) -> None:
        if self._wrapper is not None:
            self._wrapper._remove_autograd_hooks()
            self._wrapper = None
