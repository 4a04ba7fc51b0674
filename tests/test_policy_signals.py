"""Health signals measure what they claim, only when asked, and survive a checkpoint.

The residual functional gradient is checked against cases with a known answer: when the loss wants
the layer output to move linearly in the layer input (a linear regression target), a change of the
host's own weights can do it all and the residual is ~0; when it wants a nonlinear function of the
input, a large part is left for new capacity.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper_core.policy.signals import GlobalSignals, LayerSignals, PlateauTracker
from esper_core.seeds.kasmina import KasminaLayer


def _measure(layer: KasminaLayer, x: torch.Tensor, target: torch.Tensor, batches: int = 8) -> LayerSignals:
    signals = LayerSignals(decay=0.5)
    for i in range(batches):
        xb, tb = x[i::batches], target[i::batches]
        with signals.measuring({"l": layer}, active=True):
            y = layer(xb)
        ((y - tb) ** 2).sum(dim=1).mean().backward()
    return signals


def test_residual_is_zero_for_a_linear_target_and_large_for_a_nonlinear_one() -> None:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 3), slots=1, eta=1.0)
    x = torch.randn(2048, 4)
    linear = _measure(layer, x, x @ torch.randn(4, 3)).read()["l"]
    assert linear.gradient > 1.0 and linear.residual_share < 1e-3
    nonlinear = _measure(layer, x, torch.sin(3 * x[:, :3]) * x[:, 3:]).read()["l"]
    assert nonlinear.residual_share > 0.3


def test_conv_layers_are_measured_per_position() -> None:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Conv2d(2, 3, 3, padding=1, bias=False), slots=1, eta=1.0)
    x = torch.randn(64, 2, 6, 6)
    health = _measure(layer, x, layer.host(x).detach() * 0.5).read()["l"]  # a target the weights can reach
    assert health.gradient > 0 and health.residual_share < 1e-3


def test_activation_statistics() -> None:
    dead = nn.Linear(5, 4)
    nn.init.constant_(dead.bias, -100.0)
    rank_one = nn.Linear(5, 4, bias=False)
    with torch.no_grad():
        rank_one.weight.copy_(torch.ones(4, 1) @ torch.randn(1, 5))
    x = torch.randn(256, 5)
    a, b = KasminaLayer(dead, 1, 1.0), KasminaLayer(rank_one, 1, 1.0)
    signals = LayerSignals(decay=0.0)
    with signals.measuring({"dead": a, "rank1": b}, active=True), torch.no_grad():
        a(x), b(x)
    assert signals.read() == {}  # no backward pass yet: a layer is read only with its gradient statistics
    stats = signals.state_dict()
    assert stats["dead/dead"].item() == 1.0
    assert stats["rank1/erank"].item() == pytest.approx(0.25, abs=1e-3)  # one direction of four


def test_hooks_exist_only_while_measuring() -> None:
    layer = KasminaLayer(nn.Linear(3, 3), 1, 1.0)
    signals = LayerSignals(decay=0.5)
    with signals.measuring({"l": layer}, active=False):
        assert not layer._forward_hooks
        layer(torch.randn(4, 3)).sum().backward()
    assert signals.state_dict() == {}
    with signals.measuring({"l": layer}, active=True):
        assert layer._forward_hooks
    assert not layer._forward_hooks


def test_layer_signals_survive_a_checkpoint() -> None:
    torch.manual_seed(1)
    layer = KasminaLayer(nn.Linear(4, 3), 1, 1.0)
    x = torch.randn(256, 4)
    first = _measure(layer, x, torch.sin(x[:, :3]))
    second = LayerSignals(decay=0.5)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()}, torch.device("cpu"))
    assert second.read() == first.read()


def test_global_signals_trends_gap_plateau_and_state() -> None:
    signals = GlobalSignals(window=3, plateau=PlateauTracker(patience=2, min_delta=0.01))
    for step, loss in [(10, 2.0), (20, 1.5), (30, 1.0), (40, 0.5)]:
        signals.observe_train(step, loss)
    signals.observe_train(50, math.nan)  # a non-finite read is not a trend point
    assert [s for s, _ in signals.train] == [20, 30, 40]
    for step, loss in [(20, 1.2), (40, 1.19), (60, 1.195)]:
        signals.observe_validation(step, loss, loss)
    summary = signals.to_json()
    assert summary["train_trend_per_1k"] == pytest.approx(-50.0)
    assert summary["train_val_gap"] == pytest.approx(1.195 - 1.0)
    assert signals.plateau.plateaued(2) and signals.plateau.best_step == 20
    assert not signals.underfitting(0.1) and signals.underfitting(0.2)
    restored = GlobalSignals(window=3, plateau=PlateauTracker(patience=2, min_delta=0.01))
    restored.load_state_dict(signals.state_dict())
    assert restored.to_json() == summary
