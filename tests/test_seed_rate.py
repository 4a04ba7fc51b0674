"""Seeds learn at their own rate while the run improves, and no faster than the host once it has stopped
(`seeds.lr_schedule: adaptive`, the default; see esper_core/growth/seed_rate.py): the switch happens at
the validation where the metric's trend over `policy.trend_window` evaluations stops rising, is recorded,
caps the seed group at the host's learning rate under the user's own scheduler, and survives a
checkpoint. `window` never switches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper_core import Evaluation, GrowthController, load_checkpoint, save_checkpoint
from esper_core.compiler.store import LocalKernelStore
from factories import TwoLinear
from esper_core.growth import optimizer as optim
from esper_core.growth.seed_rate import SeedRate
from esper_cli.progress import describe

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(256, 8, generator=DATA), torch.randint(0, 4, (256,), generator=DATA)
HOST_LR = 0.05
# Validation accuracy every 10 steps: rising for five evaluations, then flat and slipping (the shape
# of an MLP on the teacher task that starts to overfit).
ACCURACIES = [0.40, 0.46, 0.51, 0.55, 0.58, 0.60, 0.61, 0.61, 0.60, 0.60, 0.59, 0.59]
SWITCH_AT = 100  # the first window of five whose slope is not positive: 0.60, 0.61, 0.61, 0.60, 0.60


def build(tmp_path: Path, schedule: str, max_seeds: int = 1) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                                                GrowthController]:
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=HOST_LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)  # the user's, on the host
    growth = GrowthController(model, optimizer, example=X[:2], max_steps=200, store=LocalKernelStore(tmp_path / "k"),
                              schedulers=[scheduler],
                              seeds={"targets": ["fc1"], "blueprints": ["wide_mlp"], "lr_schedule": schedule},
                              policy={"trigger": "periodic", "period_steps": 10, "growth_window": [0.0, 1.0],
                                      "max_seeds": max_seeds})
    return model, optimizer, scheduler, growth


def validation(accuracy: float) -> Evaluation:
    return Evaluation(accuracy, True, "accuracy", 1.0, None)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          growth: GrowthController, steps: range) -> list[tuple[int, float, float]]:
    """The user's loop; returns (step, host lr, seed lr) after every validation."""
    seen = []
    for step in steps:
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = F.cross_entropy(model(X[batch]), Y[batch])
        optimizer.zero_grad()
        loss.backward()
        growth.after_backward()
        optimizer.step()
        scheduler.step()
        growth.after_step(loss)
        if growth.step % 10 == 0:
            growth.after_validation(validation(ACCURACIES[growth.step // 10 - 1]))
            seeds = optim.seed_group(optimizer)
            seen.append((growth.step, optim.host_group(optimizer)["lr"], seeds["lr"] if seeds else None))
    return seen


def test_seeds_learn_at_their_own_rate_until_the_metric_stops_rising_then_at_most_the_hosts(tmp_path: Path) -> None:
    model, optimizer, scheduler, growth = build(tmp_path, "adaptive")
    seen = train(model, optimizer, scheduler, growth, range(120))
    own = HOST_LR * 2.0  # the default seeds.lr_scale, on the optimizer's learning rate when the controller was built
    before = [(s, seed) for s, _, seed in seen if seed is not None and s < SWITCH_AT]
    assert before and all(seed == pytest.approx(own) for _, seed in before)
    after = [(s, host, seed) for s, host, seed in seen if s >= SWITCH_AT]
    assert after and all(seed is not None and seed < own for _, _, seed in after)
    # capped at the host group's rate as after_step finds it: here the user's cosine, stepped before it
    for s, host, seed in after:
        assert seed == pytest.approx(host) == pytest.approx(HOST_LR * 0.5 * (1 + math.cos(math.pi * s / 200)))
    events = [e for e in growth.recorder.events if e["event"] == "seed_lr"]
    assert [e["step"] for e in events] == [SWITCH_AT]
    assert "stopped improving" in events[0]["reason"] and events[0]["metric_trend_per_1k"] <= 0
    assert describe(events[0]) == f"step {SWITCH_AT}: {events[0]['reason']}"  # what `esper train` prints


def test_the_switch_travels_in_checkpoints(tmp_path: Path) -> None:
    model, optimizer, scheduler, growth = build(tmp_path, "adaptive")
    train(model, optimizer, scheduler, growth, range(110))
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, growth=growth)
    lr = optim.seed_group(optimizer)["lr"]

    resumed_model, resumed_optimizer, _, resumed = build(tmp_path, "adaptive")
    load_checkpoint(tmp_path / "ckpt", model=resumed_model, optimizer=resumed_optimizer, growth=resumed)
    assert resumed.seed_rate.switched_step == SWITCH_AT
    assert optim.seed_group(resumed_optimizer)["lr"] == lr


@pytest.mark.parametrize("schedule", ["window", "host"])
def test_other_schedules_never_switch(tmp_path: Path, schedule: str) -> None:
    model, optimizer, scheduler, growth = build(tmp_path, schedule)
    seen = train(model, optimizer, scheduler, growth, range(120))
    assert not [e for e in growth.recorder.events if e["event"] == "seed_lr"]
    assert all(seed == pytest.approx(HOST_LR * 2.0) for _, _, seed in seen if seed is not None)


def test_a_run_that_cannot_grow_never_switches(tmp_path: Path) -> None:
    """With growth off (``policy.max_seeds=0``, the static arm of every comparison) there are no seeds
    to slow down: no ``seed_lr`` event, and `esper train` prints no line about seeds."""
    model, optimizer, scheduler, growth = build(tmp_path, "adaptive", max_seeds=0)
    train(model, optimizer, scheduler, growth, range(120))
    assert not [e for e in growth.recorder.events if e["event"] == "seed_lr"]
    assert not growth.seed_rate.switched


def test_a_metric_that_keeps_rising_never_switches() -> None:
    rate = SeedRate(adaptive=True, window=5)
    for step in range(100, 3100, 100):  # +0.3 points per evaluation, with an evaluation-to-evaluation wobble
        accuracy = 0.6 + 0.003 * step / 100 + (0.004 if step % 200 else -0.004)
        assert rate.observe_validation(step, -accuracy, "accuracy") is None
    assert not rate.switched and rate.rate(0.006) == 0.006
