"""Learning-rate schedules (``trainer.schedule``): each is PyTorch's scheduler of the same name, step for
step, after the warm-up; the schedule is what the host's optimizer group gets; seeds that follow the host
(``seeds.lr_schedule: host``) follow it too; ``step`` without ``step_size`` is a located recipe error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from esper_core.errors import ConfigError
from esper_core.recipe import load_recipe
from esper_core.recipe.schema import SeedsConfig, TrainerConfig
from esper_core.training import optim
from esper_core.training.schedules import lr_factor

STEPS = 100


def _torch_lrs(make: object, steps: int = STEPS, lr: float = 0.1) -> list[float]:
    """The learning rate PyTorch's scheduler gives each of ``steps`` optimizer steps."""
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=lr)
    scheduler = make(optimizer)  # type: ignore[operator]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _ours(cfg: TrainerConfig, steps: int = STEPS) -> list[float]:
    return [cfg.lr * lr_factor(step, cfg) for step in range(steps)]


@pytest.mark.parametrize(("schedule", "make"), [
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)),
    ("linear", lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=STEPS)),
    ("constant", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0)),
])
def test_decaying_schedules_match_pytorch(schedule: str, make: object) -> None:
    cfg = TrainerConfig(lr=0.1, max_steps=STEPS, schedule=schedule)
    assert _ours(cfg) == pytest.approx(_torch_lrs(make), rel=1e-9, abs=1e-12)


def test_the_step_schedule_matches_steplr_after_its_warm_up() -> None:
    cfg = TrainerConfig(lr=0.1, max_steps=STEPS, schedule="step", step_size=30, gamma=0.5, warmup_steps=10)
    ours = _ours(cfg)
    assert ours[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])  # the linear warm-up
    reference = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.5), STEPS - 10)
    assert ours[10:] == pytest.approx(reference)
    assert ours[10] == pytest.approx(0.1) and ours[-1] == pytest.approx(0.1 * 0.5 ** 2)  # 89 // 30 decays


@pytest.mark.parametrize("warmup", [0, 20])
def test_one_cycle_is_pytorchs_onecycle_with_the_warm_up_as_its_rise(warmup: int) -> None:
    cfg = TrainerConfig(lr=0.1, max_steps=STEPS, schedule="one_cycle", warmup_steps=warmup)
    pct = (warmup or 0.3 * STEPS) / STEPS
    reference = _torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS, pct_start=pct, anneal_strategy="cos", cycle_momentum=False))
    assert _ours(cfg) == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert max(_ours(cfg)) == pytest.approx(0.1)


def test_the_host_group_gets_the_schedule_and_host_following_seeds_too() -> None:
    cfg = TrainerConfig(lr=0.1, max_steps=STEPS, schedule="linear", warmup_steps=10)
    optimizer = optim.build_optimizer(nn.Linear(2, 2), cfg)
    optim.apply_lr(optimizer, 55, cfg)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 45 / 90))
    seeds = SeedsConfig(lr_schedule="host", lr_scale=2.0)
    assert optim.seed_lr(55, cfg, seeds, 0.7) == pytest.approx(2.0 * optimizer.param_groups[0]["lr"])


def test_a_step_schedule_without_step_size_is_a_located_recipe_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainer:\n  max_steps: 100\n  schedule: step\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_recipe(recipe)
    (problem,) = caught.value.problems
    assert str(problem) == f"{recipe}:1: trainer: `step_size` is required when schedule is 'step'"
