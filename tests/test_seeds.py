"""The seed semantics of DESIGN.md, tested on real modules: function-preserving germination,
gradient-isolated incubation that still learns, blending, fossilize, cull, and the step clock."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from esper_core import SeedState, wrap
from esper_core.blueprints.library import BlueprintLibrary
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.recipe.schema import SeedsConfig, TrainerConfig
from esper_core.seeds.lifecycle import TRANSITIONS, IllegalTransition, check_transition
from esper_core.seeds.manager import SeedManager, SlotRef, alpha_at
from esper_core.growth import optimizer as seed_groups
from esper_core.training import optim

LIBRARY = BlueprintLibrary.discover()


def _seed_for(manager: SeedManager, layer: str, blueprint: str, rank: int = 4) -> nn.Module:
    spec = KernelSpec(LIBRARY.get(blueprint).blueprint, manager.layers[layer].spec, rank)
    module, _ = build_kernel(spec)
    return module


def _randomise(module: nn.Module) -> None:
    """Give every parameter non-zero values so a leaking contribution could not hide behind zeros."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _plant(manager: SeedManager, layer: str, blueprint: str, randomise: bool = True) -> SlotRef:
    ref = SlotRef(layer, 0)
    seed = _seed_for(manager, layer, blueprint)
    if randomise:
        _randomise(seed)
    manager.germinate(ref, blueprint, "test", 0)
    manager.start_incubation(ref, seed)
    return ref


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 4, 1))


CASES = [("lowrank_adapter", _mlp, (5, 6)), ("wide_mlp", _mlp, (5, 6)),
         ("residual_conv", _cnn, (2, 3, 9, 7)), ("dwsep_conv", _cnn, (2, 3, 9, 7)), ("se_gate", _cnn, (2, 3, 9, 7))]


@pytest.mark.parametrize("blueprint,make,shape", CASES)
def test_germination_and_incubation_preserve_the_function_exactly(blueprint, make, shape):
    model = make()
    manager = wrap(model, targets=["2"], per_layer=1)
    x = torch.randn(*shape)
    before = model(x)
    ref = _plant(manager, "2", blueprint)
    assert manager.state(ref) == SeedState.TRAINING
    assert torch.equal(model(x), before)
    manager.layers["2"].start_blending(0)  # alpha 0: still exactly the host function
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("blueprint,make,shape", CASES)
def test_incubation_sends_no_gradient_to_the_host_but_trains_the_seed(blueprint, make, shape):
    plain = make()
    seeded = copy.deepcopy(plain)
    manager = wrap(seeded, targets=["2"])
    ref = _plant(manager, "2", blueprint)
    x = torch.randn(*shape)
    target = torch.randn_like(plain(x))
    F.mse_loss(plain(x), target).backward()
    F.mse_loss(seeded(x), target).backward()
    host_grads = {n.replace(".host", ""): p.grad for n, p in seeded.named_parameters() if ".seeds." not in n}
    for name, p in plain.named_parameters():
        assert torch.equal(host_grads[name], p.grad), name
    seed_grads = [p.grad for p in manager.seed_parameters(ref)]
    assert all(g is not None for g in seed_grads)
    assert any(g.abs().sum() > 0 for g in seed_grads)


def test_zero_initialised_seed_escapes_the_dead_start():
    """lowrank_adapter's up-projection starts at zero; incubation must still move both layers."""
    model = _mlp()
    manager = wrap(model, targets=["2"])
    ref = _plant(manager, "2", "lowrank_adapter", randomise=False)
    down, up = manager.seed_parameters(ref)
    assert up.abs().sum() == 0
    opt = torch.optim.SGD(manager.seed_parameters(ref), lr=0.1)
    x, target = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    assert up.abs().sum() > 0
    assert down.grad is not None and down.grad.abs().sum() > 0


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


def test_incubated_seed_lowers_the_loss_as_soon_as_it_is_blended_in():
    """DESIGN.md's experiment: a narrow MLP host on digits, a low-rank seed on its first layer
    incubated for 300 steps while the host trains; blending it in lowers the loss at once."""
    x, y = _digits()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    manager = wrap(model, targets=["0"], config=SeedsConfig(eta=0.8))
    host_opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * 20, 64)]
    for step in range(100):  # the host first learns what it can
        bx, by = batches[step % len(batches)]
        host_opt.zero_grad()
        F.cross_entropy(model(bx), by).backward()
        host_opt.step()
    ref = SlotRef("0", 0)
    manager.germinate(ref, "lowrank_adapter", "test", 0)
    manager.start_incubation(ref, _seed_for(manager, "0", "lowrank_adapter", rank=8))
    seed_opt = torch.optim.Adam(manager.seed_parameters(ref), lr=3e-3)
    for step in range(300):
        bx, by = batches[step % len(batches)]
        host_opt.zero_grad()
        seed_opt.zero_grad()
        F.cross_entropy(model(bx), by).backward()
        host_opt.step()
        seed_opt.step()
    seen_x, seen_y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        before = F.cross_entropy(model(seen_x), seen_y).item()
        manager.layers["0"].start_blending(0)
        manager.layers["0"].set_alpha(0, 1.0)
        after = F.cross_entropy(model(seen_x), seen_y).item()
    assert after < before * 0.98, (before, after)


def test_fossilized_seed_stays_and_contributes():
    model = _mlp()
    manager = wrap(model, targets=["2"])
    ref = _plant(manager, "2", "lowrank_adapter")
    layer = manager.layers["2"]
    layer.start_blending(0)
    layer.start_probation(0)
    manager.fossilize(ref)
    assert manager.state(ref) == SeedState.FOSSILIZED
    assert any(".seeds.0." in k for k in model.state_dict())
    x = torch.randn(4, 6)
    with layer.muted(0):
        muted = model(x)
    assert not torch.equal(model(x), muted)


@pytest.mark.parametrize("blueprint,make,shape", CASES)
def test_a_seed_in_probation_or_fossilized_computes_the_same_bits_as_blended_at_alpha_one(blueprint, make, shape):
    """From probation on a seed is a plain branch (no ``* alpha``): output and every gradient must be
    exactly what the blended path gives at alpha 1, and muting must still silence the seed."""
    model = make()
    manager = wrap(model, targets=["2"], per_layer=1)
    host_only = copy.deepcopy(model)
    ref = _plant(manager, "2", blueprint)
    layer = manager.layers["2"]
    layer.start_blending(0)
    layer.set_alpha(0, 1.0)
    x = torch.randn(*shape)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    blended, blended_grads = run()
    layer.start_probation(0)
    for state in ("probation", "fossilized"):
        if state == "fossilized":
            manager.fossilize(ref)
        fixed, fixed_grads = run()
        assert torch.equal(fixed, blended), state
        assert all(torch.equal(a, b) for a, b in zip(fixed_grads, blended_grads)), state
    with torch.no_grad(), layer.muted(0):
        assert torch.equal(model(x), host_only(x))
    assert torch.equal(run()[0], blended)  # unmuted again: the seed is back


def test_culled_seed_is_gone_from_module_state_dict_and_optimizer():
    model = _mlp()
    manager = wrap(model, targets=["2"])
    opt = optim.build_optimizer(model, TrainerConfig())
    ref = _plant(manager, "2", "lowrank_adapter")
    seed_groups.add_params(opt, manager.seed_parameters(ref), 1e-3)
    x = torch.randn(8, 6)
    model(x).sum().backward()
    opt.step()
    seed_params = manager.seed_parameters(ref)
    assert all(p in opt.state for p in seed_params)
    _, removed = manager.cull(ref)
    seed_groups.remove_params(opt, removed)
    assert {id(p) for p in removed} == {id(p) for p in seed_params}
    assert manager.state(ref) == SeedState.CULLED
    assert "0" not in manager.layers["2"].seeds
    assert not any(".seeds." in k for k in model.state_dict())
    assert [(g["name"], len(g["params"])) for g in opt.param_groups] == [("host", 6), ("seeds", 0)]
    assert not any(p in opt.state for p in seed_params)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for g in opt.param_groups for p in g["params"])
    host_only = copy.deepcopy(model)
    host_only[2] = host_only[2].host
    assert torch.equal(model(x), host_only(x))


def test_every_illegal_transition_raises():
    for current, target in itertools.product(SeedState, SeedState):
        if target in TRANSITIONS[current]:
            check_transition(current, target)
        else:
            with pytest.raises(IllegalTransition):
                check_transition(current, target)


def test_layer_refuses_out_of_order_operations():
    model = _mlp()
    manager = wrap(model, targets=["2"])
    layer = manager.layers["2"]
    with pytest.raises(IllegalTransition):
        layer.start_blending(0)
    ref = _plant(manager, "2", "lowrank_adapter")
    with pytest.raises(IllegalTransition):
        layer.germinate(0, "lowrank_adapter", "x", 0, 0)
    with pytest.raises(IllegalTransition):
        manager.fossilize(ref)  # TRAINING -> FOSSILIZED skips blending and probation


def test_lifecycle_counts_optimizer_steps_not_forward_calls():
    model = _mlp()
    config = SeedsConfig(incubation_steps=3, blend_steps=4, probation_steps=2, embargo_steps=2)
    manager = wrap(model, targets=["2"], config=config)
    ref = _plant(manager, "2", "lowrank_adapter")
    for _ in range(10):
        model(torch.randn(2, 6))
    assert manager.state(ref) == SeedState.TRAINING
    states, alphas, due = [], [], []
    for _ in range(9):
        manager.step()
        states.append(manager.state(ref))
        alphas.append(float(manager.layers["2"].alpha[0]))
        due.append(manager.due_for_verdict() == [ref])
    assert states[:3] == [SeedState.TRAINING, SeedState.TRAINING, SeedState.BLENDING]
    assert alphas[3:6] == [0.25, 0.5, 0.75]
    assert states[6] == SeedState.PROBATION and alphas[6] == 1.0
    assert due == [False] * 8 + [True]
    manager.cull(ref)
    manager.step()
    assert manager.state(ref) == SeedState.CULLED
    manager.step()
    assert manager.state(ref) == SeedState.DORMANT


def test_gated_blend_waits_while_the_loss_rises():
    model = _mlp()
    manager = wrap(model, targets=["2"], config=SeedsConfig(incubation_steps=1, blend_steps=4, blend_schedule="gated"))
    _plant(manager, "2", "lowrank_adapter")
    manager.step()  # -> BLENDING
    manager.step(gate_open=True)
    held = float(manager.layers["2"].alpha[0])
    for _ in range(5):
        manager.step(gate_open=False)
    assert float(manager.layers["2"].alpha[0]) == held == 0.25


def test_cosine_ramp_is_smooth_and_ends_at_one():
    values = [alpha_at("cosine", t / 10) for t in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(values, values[1:]))


def test_dormant_layer_forward_is_the_host_forward():
    model = _mlp()
    reference = copy.deepcopy(model)
    manager = wrap(model, targets=["type:Linear"], per_layer=3)
    x = torch.randn(7, 6)
    assert torch.equal(model(x), reference(x))
    assert all(layer._active == [] for layer in manager.layers.values())


def test_an_incubating_seed_output_gets_the_task_gradient_plus_the_proximal_pull():
    """The incubation objective <g, dL/dy> + ||g||^2 / (2 eta B): the seed output's gradient is exactly
    dL/dy + g / (eta B), and the layer output's gradient is what it would be without the seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    manager = wrap(model, targets=["0"], per_layer=1, config=SeedsConfig(eta=0.8))
    _plant(manager, "0", "wide_mlp")
    layer = manager.layers["0"]
    seen: dict[str, torch.Tensor] = {}
    def keep_gradient(module: nn.Module, inputs: object, out: torch.Tensor) -> None:
        out.register_hook(lambda grad: seen.setdefault("seed", grad))

    layer.seed_module(0).register_forward_hook(keep_gradient)
    x = torch.randn(7, 6)
    y_host = layer.host(x).detach().requires_grad_()
    reference = model[2](model[1](y_host)).square().mean()
    reference.backward()
    out = model(x)
    out.square().mean().backward()
    g = layer.seed_module(0)(x).detach()
    torch.testing.assert_close(seen["seed"], y_host.grad + g / (0.8 * 7), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, model[2](model[1](layer.host(x))), rtol=0, atol=0)


def test_alpha_lives_in_a_buffer_and_incubation_keeps_it_zero():
    model = _mlp()
    manager = wrap(model, targets=["2"], per_layer=2)
    buffers = dict(model.named_buffers())
    assert buffers["2.alpha"].shape == (2,) and "2.isolate" not in buffers
    _plant(manager, "2", "lowrank_adapter")
    assert float(dict(model.named_buffers())["2.alpha"][0]) == 0.0
