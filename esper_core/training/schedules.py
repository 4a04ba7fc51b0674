"""Learning-rate schedules of ``esper train``: a factor on the host group's base learning rate per
optimizer step, a pure function of the step and the recipe.

A pure function rather than a ``torch.optim.lr_scheduler`` object: growth adds and removes parameter
groups during the run (those schedulers fix their group list at construction), and a function of the
step has no state, so a checkpoint, a rollback or a resume can never put it out of step. The shapes
are PyTorch's own, so a user's expectations carry over (a test compares each with its scheduler):

- ``constant``; ``cosine`` (to 0 at ``max_steps``, as ``CosineAnnealingLR``); ``linear`` (to 0 at
  ``max_steps``, as ``LinearLR(1, 0)``); ``step`` (times ``gamma`` every ``step_size`` steps, as
  ``StepLR``) — each after a linear warm-up of ``warmup_steps``;
- ``one_cycle``: ``OneCycleLR`` with its defaults (cosine from ``lr / 25`` up to ``lr``, then down to
  ``lr / 25e4``), whose rise is the warm-up: ``warmup_steps``, or 30% of the run when that is 0.
"""

from __future__ import annotations

import math

from esper_core.recipe.schema import TrainerConfig

ONE_CYCLE_DIV = 25.0
"""OneCycleLR's ``div_factor``: the cycle starts at ``lr / ONE_CYCLE_DIV``."""
ONE_CYCLE_FINAL_DIV = 1e4
"""OneCycleLR's ``final_div_factor``: the cycle ends at its start divided by this."""
ONE_CYCLE_RISE = 0.3
"""OneCycleLR's ``pct_start``: the share of the run spent rising when ``warmup_steps`` is 0."""


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if cfg.schedule == "one_cycle":
        return _one_cycle(step, cfg)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    after = step - cfg.warmup_steps
    progress = min(1.0, after / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - progress
    if cfg.schedule == "step":
        assert cfg.step_size is not None  # the schema requires it for this schedule
        return cfg.gamma ** (after // cfg.step_size)
    return 1.0


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1.0)


def _one_cycle(step: int, cfg: TrainerConfig) -> float:
    """PyTorch's two-phase ``OneCycleLR`` (cosine annealing) as a factor of ``lr``, its peak."""
    low = 1.0 / ONE_CYCLE_DIV
    rise = cfg.warmup_steps or ONE_CYCLE_RISE * cfg.max_steps
    peak = rise - 1.0  # the step at which the factor is 1, as PyTorch counts
    if step <= peak and peak > 0:
        return _cosine(low, 1.0, step / peak)
    start = max(peak, 0.0)
    return _cosine(1.0, low / ONE_CYCLE_FINAL_DIV, min(1.0, (step - start) / max(1.0, cfg.max_steps - 1 - start)))
