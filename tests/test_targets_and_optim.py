"""Which layers get wrapped, and what growth does to the optimizer and its LR schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_core import KasminaLayer, wrap
from esper_core.errors import ConfigError
from esper_core.recipe.schema import TrainerConfig
from esper_core.seeds.manager import SlotRef
from esper_core.seeds.targets import match_targets
from esper_core.growth import optimizer as groups
from esper_core.training import optim


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)


class MyLinear(nn.Linear):
    pass


def test_glob_regex_type_and_exclude():
    net = Net()
    assert match_targets(net, ["features.*"]) == ["features.0", "features.2"]
    assert match_targets(net, ["re:features\\.[02]"]) == ["features.0", "features.2"]
    assert match_targets(net, ["type:Linear"], exclude=["head"]) == ["proj"]
    net.proj = MyLinear(4, 8)
    assert match_targets(net, ["type:Linear"]) == ["proj", "head"]  # subclasses match


def test_a_pattern_matching_nothing_lists_what_could_match():
    with pytest.raises(ConfigError) as info:
        wrap(Net(), targets=["type:Linear", "layer*"])
    problem = info.value.problems[0]
    assert problem.field == "seeds.targets.1"
    assert ("'layer*' matches no module that can host seeds (Linear, Conv1d, Conv2d, transformers' Conv1D); "
            "matchable: features.0, features.2, proj, head") in problem.message


def test_an_exclude_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError) as info:
        wrap(Net(), targets=["type:Linear"], exclude=["haed"])
    problem = info.value.problems[0]
    assert problem.field == "seeds.exclude.0" and "'haed' excludes nothing" in problem.message
    assert "head" in problem.message  # the modules it could have meant


def test_a_selected_module_that_cannot_host_seeds_is_named_with_its_type():
    net = Net()
    net.norm = nn.LayerNorm(8)
    with pytest.raises(ConfigError) as info:
        wrap(net, targets=["proj", "norm"])
    problem = info.value.problems[0]
    assert problem.field == "seeds.targets.1"
    assert "'norm', a LayerNorm, which cannot host seeds (supported: Linear, Conv1d, Conv2d" in problem.message
    # parameter-free modules a glob happens to select (activations, containers) are passed over
    assert list(wrap(Net(), targets=["features.*"]).layers) == ["features.0", "features.2"]


def test_wrapping_twice_is_a_clear_error():
    net = Net()
    wrap(net, targets=["proj"])
    with pytest.raises(ConfigError, match="already wrapped .*proj"):
        wrap(net, targets=["head"])


@pytest.mark.parametrize("host", [nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
                                  nn.Conv2d(3, 4, (2, 4), padding="same"), nn.Conv1d(3, 4, 5, padding=2),
                                  nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular")])
def test_convolutions_with_any_padding_host_seeds(host: nn.Module):
    from esper_core.blueprints.builder import build, resolve
    from esper_core.blueprints.library import BlueprintLibrary

    model = nn.Sequential(host)
    manager = wrap(model, targets=["0"])
    layer = manager.layers["0"]
    x = torch.randn(2, 3, *((9, 7) if isinstance(host, nn.Conv2d) else (11,)))
    before = model(x)
    name = "residual_conv" if isinstance(host, nn.Conv2d) else "residual_conv1d"
    seed = build(resolve(BlueprintLibrary.discover().get(name).blueprint, layer.spec, 4))
    manager.germinate(SlotRef("0", 0), name, "k", 0)
    manager.start_incubation(SlotRef("0", 0), seed)
    assert torch.equal(model(x), before)  # function-preserving germination on this geometry
    with torch.no_grad():
        layer.start_blending(0)
        layer.set_alpha(0, 1.0)
        for p in seed.parameters():
            p.normal_()
    assert model(x).shape == before.shape and not torch.equal(model(x), before)


def test_a_gpt2_conv1d_is_a_linear_host():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs
    spec = KasminaLayer(conv, 1, 1.0).spec
    assert (spec.kind, spec.in_features, spec.out_features) == ("linear", 4, 6)


def test_a_broken_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid regular expression"):
        wrap(Net(), targets=["re:("])


def test_wrap_replaces_modules_in_place():
    net = Net()
    manager = wrap(net, targets=["proj"], per_layer=2)
    assert isinstance(net.proj, KasminaLayer) and manager.layers["proj"] is net.proj
    assert len(net.proj.slots) == 2


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_on_the_cpu_the_optimizer_is_torchs_fused_kernel_for_host_and_seeds(name: str) -> None:
    """On the CPU torch's default optimizer loops over the parameter tensors in Python, which cost a
    third of the quickstart's training step: ``esper train`` asks for the fused kernel, seeds included,
    and it updates every parameter as torch's default does (to float rounding)."""
    cfg = TrainerConfig(lr=0.05, optimizer=name, momentum=0.9)
    torch.manual_seed(0)
    model, seed = nn.Linear(4, 3), nn.Linear(4, 3)
    twin_model, twin_seed = nn.Linear(4, 3), nn.Linear(4, 3)
    twin_model.load_state_dict(model.state_dict())
    twin_seed.load_state_dict(seed.state_dict())
    fused = optim.build_optimizer(model, cfg)
    groups.add_params(fused, seed.parameters(), lr=0.1)
    plain = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name](
        [{"params": list(twin_model.parameters())}], lr=0.05, **({"momentum": 0.9} if name == "sgd" else {}),
        weight_decay=cfg.weight_decay)
    plain.add_param_group({"params": list(twin_seed.parameters()), "lr": 0.1})
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert not any(g["fused"] for g in plain.param_groups)
    x = torch.randn(8, 4)
    for _ in range(3):
        for opt, net, branch in ((fused, model, seed), (plain, twin_model, twin_seed)):
            opt.zero_grad()
            (net(x) + branch(x)).square().mean().backward()
            opt.step()
    for a, b in zip([*model.parameters(), *seed.parameters()], [*twin_model.parameters(), *twin_seed.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_schedule_moves_the_host_and_seed_groups_keep_their_own_lr():
    cfg = TrainerConfig(lr=0.1, schedule="cosine", max_steps=100, warmup_steps=10)
    model = nn.Linear(3, 3)
    opt = optim.build_optimizer(model, cfg)
    optim.apply_lr(opt, 4, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    extra, later = nn.Linear(3, 3), nn.Linear(3, 3)
    groups.add_params(opt, extra.parameters(), lr=0.2)
    groups.add_params(opt, later.parameters(), lr=0.2)
    assert [g["name"] for g in opt.param_groups] == ["host", "seeds"]  # one group for every seed
    optim.apply_lr(opt, 55, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert opt.param_groups[1]["lr"] == 0.2  # the growth controller owns seed groups' learning rate
    x = torch.ones(1, 3)
    (model(x).sum() + extra(x).sum() + later(x).sum()).backward()
    opt.step()
    assert all(p in opt.state for p in [*extra.parameters(), *later.parameters()])
    groups.remove_params(opt, extra.parameters())
    assert not any(p in opt.state for p in extra.parameters())
    assert all(p in opt.state for p in later.parameters())  # the other seed keeps its moments
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in later.parameters()]
    with pytest.raises(ValueError):
        groups.add_params(opt, later.parameters(), 0.1)  # already in the optimizer
    with pytest.raises(KeyError):
        groups.remove_params(opt, extra.parameters())  # already gone
    groups.remove_params(opt, later.parameters())
    # the group stays, empty: a scheduler keeps one value per group and fails when the number changes
    assert [(g["name"], g["params"]) for g in opt.param_groups][1:] == [("seeds", [])]


def test_optimizer_state_round_trips_by_parameter_name_across_a_new_optimizer():
    model = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 2), "seed": nn.Linear(3, 2)})
    host = [*model["a"].parameters(), *model["b"].parameters()]
    opt = torch.optim.AdamW(host, lr=0.01)
    groups.add_params(opt, model["seed"].parameters(), lr=0.02)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(5, 3)
        (model["b"](model["a"](x)).sum() + model["seed"](x).sum()).backward()
        opt.step()
    saved = groups.export_state(opt, model)
    assert [g["name"] for g in saved["groups"]] == ["#0", "seeds"]
    fresh = torch.optim.AdamW(host, lr=0.01)
    groups.add_params(fresh, model["seed"].parameters(), lr=0.02)
    groups.import_state(fresh, model, saved)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value)
    wrong = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="do not match"):
        groups.import_state(wrong, model, saved)
