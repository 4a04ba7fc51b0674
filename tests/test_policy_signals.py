"""Health signals measure what they claim, only when asked, and survive a checkpoint.

The residual functional gradient is checked against cases with a known answer: when the loss wants
the layer output to move linearly in the layer input (a linear regression target), a change of the
host's own weights can do it all and the residual is ~0; when it wants a nonlinear function of the
input, a large part is left for new capacity.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from esper_core.policy.merit import GradientMerit
from esper_core.policy.signals import GlobalSignals, LayerSignals, PlateauTracker, StatBank
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.seeds.lifecycle import SeedState


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
    with signals.measuring({"dead": a, "rank1": b}, active=True):
        (a(x).sum() + b(x).sum()).backward()
    health = signals.read()
    assert health["dead"].dead_fraction == 1.0 and health["rank1"].dead_fraction < 1.0
    assert health["rank1"].effective_rank == pytest.approx(0.25, abs=2e-3)  # one direction of four
    assert health["dead"].finite and health["rank1"].finite


@pytest.mark.parametrize("width", [8, 64])
def test_effective_rank_is_one_over_width_for_rank_one_and_near_one_for_isotropic_outputs(width: int) -> None:
    """The estimator (participation ratio of the running average covariance, read at read()): its two ends."""
    torch.manual_seed(2)
    signals = LayerSignals(decay=0.8)
    line = torch.randn(width)
    for _ in range(6):  # several measurements: the average, not one batch, is what is read
        signals.observe_activations("rank1", torch.randn(512, 1) * line, "linear")
        signals.observe_activations("isotropic", torch.randn(512, width), "linear")
    covs = {k.partition("/")[0]: v for k, v in signals.state_dict().items() if k.endswith("activations.cov")}
    from esper_core.policy.signals import _effective_rank_share
    assert _effective_rank_share(covs["rank1"]).item() == pytest.approx(1 / width, rel=0.05)
    assert _effective_rank_share(covs["isotropic"]).item() > 0.95


@pytest.mark.parametrize("size", [6, 24])
def test_conv_layers_are_measured_per_position(size: int) -> None:
    """At 24x24 a batch has more rows than a measurement takes (only the first samples are used):
    the projection is still exact for a target the weights can reach, and clearly not for one they
    cannot."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Conv2d(2, 3, 3, padding=1, bias=False), slots=1, eta=1.0)
    x = torch.randn(64, 2, size, size)
    health = _measure(layer, x, layer.host(x).detach() * 0.5).read()["l"]  # a target the weights can reach
    assert health.gradient > 0 and health.residual_share < 1e-3
    nonlinear = _measure(layer, x, torch.sin(3 * layer.host(x).detach()) ** 2).read()["l"]
    assert nonlinear.residual_share > 0.3


def test_spectral_norm_by_power_iteration_agrees_with_the_svd() -> None:
    """A fixed classifier gradient measured a few times: the persistent vector converges on the top
    singular direction, so merit matches ||G||_2 / ||W|| within a few percent, and never exceeds it."""
    torch.manual_seed(3)
    conv1, conv2, head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)
    net = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    layers = {"conv1": KasminaLayer(conv1, 1, 1.0), "conv2": KasminaLayer(conv2, 1, 1.0), "head": KasminaLayer(head, 1, 1.0)}
    nn.functional.cross_entropy(net(torch.randn(128, 3, 16, 16)), torch.randint(0, 10, (128,))).backward()
    expected = {name: (torch.linalg.matrix_norm(l.host.weight.grad.reshape(l.host.weight.shape[0], -1), ord=2)
                       / l.host.weight.norm()).item() for name, l in layers.items()}
    merit = GradientMerit(decay=0.0)  # decay 0: the score is the latest measurement's estimate
    for _ in range(5):
        merit.observe(SimpleNamespace(layers=layers))
    scores = merit.scores()
    assert scores.keys() == expected.keys()
    for name, score in scores.items():
        assert score == pytest.approx(expected[name], rel=0.02)
        assert score <= expected[name] * (1 + 1e-5)


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


def test_stat_bank_averages_accepted_measurements_the_same_whatever_is_queued_together() -> None:
    """Folding all layers at once (the fast path) and some layers only (one at a time) give the same
    averages; a rejected measurement changes nothing but its counters."""
    decay = 0.5
    bank = StatBank(decay)
    measurements = [{"a": 1.0, "b": 10.0}, {"a": 2.0}, {"a": 4.0, "b": math.nan}, {"b": 30.0, "a": 8.0}]
    for measurement in measurements:
        for layer, value in measurement.items():
            bank.add(layer, {"x": torch.tensor([value, -value])}, torch.zeros(()))
        bank.flush()

    def expected(values: list[float]) -> float:  # the first value starts the average
        mean = values[0]
        for value in values[1:]:
            mean = decay * mean + (1 - decay) * value
        return mean

    assert bank.stats("a")["x"].tolist() == pytest.approx([expected([1, 2, 4, 8]), -expected([1, 2, 4, 8])])
    assert bank.stats("b")["x"].tolist() == pytest.approx([expected([10, 30]), -expected([10, 30])])
    state = bank.state_dict()
    assert [int(state[n]["measured"]) - int(state[n]["folds"]) for n in "ab"] == [0, 1]


def _train_and_measure(model: nn.Sequential, layers: dict[str, KasminaLayer], signals: LayerSignals,
                       merit: GradientMerit, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        with signals.measuring(layers, active=True):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        merit.observe(SimpleNamespace(layers=layers))


def _wrapped_cnn() -> tuple[nn.Sequential, dict[str, KasminaLayer]]:
    conv, head = KasminaLayer(nn.Conv2d(3, 8, 3, padding=1), 1, 1.0), KasminaLayer(nn.Linear(8, 5), 1, 1.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return model, {"conv": conv, "head": head}


def test_a_checkpoint_round_trip_continues_identically() -> None:
    """Signals and merit (its persistent power-iteration vectors included, through JSON as the
    checkpoint's state.json carries it) restored mid-run measure on exactly as the uninterrupted run."""
    torch.manual_seed(4)
    model, layers = _wrapped_cnn()
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(6)]
    signals, merit = LayerSignals(decay=0.8), GradientMerit(decay=0.8)
    _train_and_measure(model, layers, signals, merit, batches[:3])
    tensors = {k: v.clone() for k, v in sorted(signals.state_dict().items())}  # safetensors sorts keys
    merit_json = json.loads(json.dumps(merit.state_dict()))
    restored_signals, restored_merit = LayerSignals(decay=0.8), GradientMerit(decay=0.8)
    restored_signals.load_state_dict(tensors, torch.device("cpu"))
    restored_merit.load_state_dict(merit_json, torch.device("cpu"))
    _train_and_measure(model, layers, signals, merit, batches[3:])
    _train_and_measure(model, layers, restored_signals, restored_merit, batches[3:])
    assert restored_merit.state_dict() == merit.state_dict()
    expected = signals.state_dict()
    assert restored_signals.state_dict().keys() == expected.keys()
    for key, value in restored_signals.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert restored_signals.read() == signals.read()


@pytest.mark.parametrize("bad", ["nan", "inf", "1e30"])
@pytest.mark.parametrize("where", ["seed", "host"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_non_finite_or_huge_activations_and_gradients_never_crash_or_poison(kind: str, where: str, bad: str) -> None:
    """Issue 11 item 6: a layer with hostile weights (a seed from a forged cache entry, or a host
    driven there) must not crash measurement or reading; the layer reads as not finite, and the
    running averages (merit included) are exactly what they would be had the hostile measurement
    never happened."""
    torch.manual_seed(5)
    host = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(32, 6) if kind == "linear" else torch.randn(32, 2, 5, 5)
    layer = KasminaLayer(host, 1, 1.0)
    hostile = copy.deepcopy(host)
    with torch.no_grad():
        hostile.weight.fill_(float(bad))
    clean, attacked = (LayerSignals(decay=0.8), GradientMerit(decay=0.8)), (LayerSignals(decay=0.8), GradientMerit(decay=0.8))

    def measure(signals: LayerSignals, merit: GradientMerit, seed: nn.Module | None = None) -> None:
        saved = host.weight.detach().clone()
        if seed is not None and where == "seed":  # the hostile seed blends in at full weight for one step
            layer.germinate(0, "hostile", "0" * 64, 0, step=0)
            layer.start_incubation(0, seed)
            layer.start_blending(0)
            layer.set_alpha(0, 1.0)
        elif seed is not None:
            with torch.no_grad():
                host.weight.copy_(seed.weight)
        layer.zero_grad(set_to_none=True)
        with signals.measuring({"l": layer}, active=True):
            y = layer(x)
        y.float().tanh().pow(2).mean().backward()  # bounded: huge outputs give finite (zero) gradients
        merit.observe(SimpleNamespace(layers={"l": layer}))
        if seed is not None and where == "seed":
            layer.remove(0, SeedState.CULLED, embargo=0)
            layer.reopen(0)
        with torch.no_grad():
            host.weight.copy_(saved)

    for signals, merit in (clean, attacked):
        measure(signals, merit)
    measure(*attacked, seed=hostile)
    assert attacked[0].nonfinite_layers() == ["l"]
    health = attacked[0].read()["l"]  # no exception, and the layer is flagged
    assert not health.finite
    assert all(v is None or isinstance(v, (bool, float)) for v in health.to_json().values())
    json.dumps(health.to_json(), allow_nan=False)
    # the direct entry points take the same hostile tensors without raising
    y = torch.full((32, 4) if kind == "linear" else (32, 4, 5, 5), float(bad))
    attacked[0].observe_activations("l", y, kind)
    attacked[0].observe_output_grad("l", layer, x, y)
    attacked[0].read()
    for signals, merit in (clean, attacked):  # a clean measurement afterwards: as if nothing happened
        measure(signals, merit)
    assert attacked[0].nonfinite_layers() == [] and attacked[0].read()["l"].finite
    assert attacked[0].read() == clean[0].read()
    if where == "seed" and bad == "1e30":  # a saturated seed leaves the host weights a finite, zero
        assert attacked[1].scores()["l"] < clean[1].scores()["l"]  # gradient: merit measures it
    else:
        assert attacked[1].scores() == clean[1].scores()
    state = attacked[0].state_dict()
    for group in ("activations", "gradients"):  # rejected measurements are counted
        assert state[f"l/{group}.measured"].item() - state[f"l/{group}.folds"].item() >= 1
    for key, value in clean[0].state_dict().items():
        if not key.endswith("measured"):
            assert torch.equal(state[key], value), key


def test_a_malformed_signal_state_is_refused_with_the_key_named() -> None:
    model, layers = _wrapped_cnn()
    signals, merit = LayerSignals(decay=0.8), GradientMerit(decay=0.8)
    _train_and_measure(model, layers, signals, merit, [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))])
    state = signals.state_dict()
    for key, value, message in [("conv/gradients.S", torch.full((10, 10), math.nan), "conv/gradients.S"),
                                ("conv/activations.cov", torch.zeros(3, 4), "conv/activations.cov"),
                                ("conv/weights.S", torch.zeros(1), "conv/weights.S")]:
        with pytest.raises(ValueError, match=message):
            LayerSignals(decay=0.8).load_state_dict(state | {key: value}, torch.device("cpu"))
    entry = merit.state_dict()["conv"]
    for bad in ({**entry, "vector": [math.inf] * len(entry["vector"])}, {**entry, "folds": -1},
                {**entry, "folds": entry["measured"] + 1}, {"merit": 1.0}):
        with pytest.raises(ValueError, match="merit.conv"):
            GradientMerit(decay=0.8).load_state_dict({"conv": bad}, torch.device("cpu"))


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
