"""The model's size as a run logs and reports it, counted again only when seeds have changed it.

Every logged step writes the trainable parameter count to ``metrics.jsonl`` and every progress report
carries it. Walking the model's parameters for it took about 20 us on the quickstart MLP, twice per
logged step, although the count changes only when a seed joins or leaves the model, is merged into
its host, or a topology is restored (rollback, resume): the moments the seed manager's
:attr:`~esper_core.seeds.manager.SeedManager.generation` changes. So the count is kept with the
generation it was taken at and taken again only when that has moved on.
"""

from __future__ import annotations

from torch import nn

from esper_core.seeds.manager import SeedManager
from esper_core.training.models import count_parameters


class ParameterCount:
    """``count_parameters(model)`` for a model whose seeds ``manager`` changes (the only thing that
    changes its parameters during a run)."""

    def __init__(self, model: nn.Module, manager: SeedManager) -> None:
        self.model, self.manager = model, manager
        self._generation: int | None = None
        self._count = 0

    def __call__(self) -> int:
        generation = self.manager.generation
        if generation != self._generation:
            self._count, self._generation = count_parameters(self.model), generation
        return self._count
