"""From a grown model to a plain one: Kasmina wrappers out, mergeable seeds folded into their hosts.

:func:`unwrap` (Esper's ``merge_and_unload``) copies the model and replaces each Kasmina layer with:

- its host alone, when no seed contributes to the output or every contributing seed was merged
  (a fossilized seed that is an exact linear map of the host's input, :mod:`esper_core.seeds.merge`);
  the model then has its original module names, so its state dict loads into the user's own class;
- otherwise a :class:`GrownLayer` ``y = host(x) + sum_i scale_i * branch_i(x)`` holding the host and
  the remaining seeds as plain submodules (``host.*``, ``branches.N.*``).

Slot bookkeeping, ``alpha``/``isolate`` buffers, dormant, germinated and culled slots disappear.
Live seeds: an incubating seed (TRAINING) contributes exactly nothing to the output and is left out;
a blending or probation seed is kept as a branch scaled by its current ``alpha`` (never merged, even
when it could be: it was not kept yet), so the export computes what the trained model computes, and
each such seed is reported (``esper export`` warns). With ``merge=False`` fossilized seeds stay
branches too.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.merge import merge_into


class GrownLayer(nn.Module):
    """A host layer plus the seeds that were not merged into it: ``host(x) + sum_i scale_i * branch_i(x)``.
    Scales are Python floats (1.0 for fossilized seeds), so an exported program holds them as constants."""

    def __init__(self, host: nn.Module, branches: list[nn.Module], scales: list[float]) -> None:
        super().__init__()
        self.host = host
        self.branches = nn.ModuleList(branches)
        self.scales = tuple(float(s) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.host(x)
        for branch, scale in zip(self.branches, self.scales):
            out = branch(x)
            y = y + (out if scale == 1.0 else out * scale)
        return y


@dataclass(frozen=True)
class SeedOutcome:
    """What :func:`unwrap` did with one seed: ``merged``, ``branch`` or ``dropped`` (and why)."""

    layer: str
    slot: int
    blueprint: str | None
    state: str
    alpha: float
    params: int
    action: str
    reason: str
    ir: dict[str, Any] | None
    target: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def unwrap(model: nn.Module, merge: bool = True) -> tuple[nn.Module, list[SeedOutcome]]:
    """A plain copy of ``model`` (see the module docstring) and what happened to each seed; ``model``
    itself is not changed."""
    plain = copy.deepcopy(model)
    outcomes: list[SeedOutcome] = []
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, KasminaLayer)]:
        host, branches, scales = layer.host, [], []
        for index, slot in enumerate(layer.slots):
            if str(index) not in layer.seeds:
                continue
            seed = layer.seeds[str(index)]
            alpha = float(layer.alpha[index])
            action, reason = _decide(slot.state, alpha, merge)
            if action == "merged" and not merge_into(host, seed, alpha):
                action, reason = "branch", "fossilized; not an exact linear map of the host's input"
            if action == "branch":
                branches.append(seed)
                scales.append(alpha)
            spec = slot.spec or {}
            outcomes.append(SeedOutcome(name, index, slot.blueprint, slot.state.name, alpha,
                                        sum(p.numel() for p in seed.parameters()), action, reason,
                                        spec.get("ir"), spec.get("target")))
        replacement = GrownLayer(host, branches, scales) if branches else host
        if name:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, replacement)
        else:
            plain = replacement
    return plain, outcomes


def _decide(state: SeedState, alpha: float, merge: bool) -> tuple[str, str]:
    if state == SeedState.FOSSILIZED:
        return ("merged", "fossilized; exact linear map folded into the host") if merge else \
            ("branch", "fossilized; --no-merge keeps it a branch")
    if state == SeedState.TRAINING or alpha == 0.0:
        return "dropped", f"{state.name.lower()}: contributes nothing to the output yet"
    return "branch", f"live ({state.name.lower()}): kept as a branch scaled by its current alpha {alpha:g}"
