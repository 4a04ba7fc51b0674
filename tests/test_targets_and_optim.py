"""Which layers get wrapped, and what growth does to the optimizer and its LR schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_core import KasminaLayer, wrap
from esper_core.errors import ConfigError
from esper_core.recipe.schema import TrainerConfig
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
    assert "'layer*' matches no Linear or Conv2d module (matchable: features.0, features.2, proj, head)" in problem.message


def test_a_broken_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid regular expression"):
        wrap(Net(), targets=["re:("])


def test_wrap_replaces_modules_in_place():
    net = Net()
    manager = wrap(net, targets=["proj"], per_layer=2)
    assert isinstance(net.proj, KasminaLayer) and manager.layers["proj"] is net.proj
    assert len(net.proj.slots) == 2


def test_the_schedule_moves_the_host_and_seed_groups_keep_their_own_lr():
    cfg = TrainerConfig(lr=0.1, schedule="cosine", max_steps=100, warmup_steps=10)
    model = nn.Linear(3, 3)
    opt = optim.build_optimizer(model, cfg)
    optim.apply_lr(opt, 4, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = nn.Linear(3, 3)
    groups.add_group(opt, "seed", extra.parameters(), lr=0.2)
    optim.apply_lr(opt, 55, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert opt.param_groups[1]["lr"] == 0.2  # the growth controller owns seed groups' learning rate
    (model(torch.ones(1, 3)).sum() + extra(torch.ones(1, 3)).sum()).backward()
    opt.step()
    assert all(p in opt.state for p in extra.parameters())
    groups.remove_group(opt, "seed")
    assert not any(p in opt.state for p in extra.parameters())
    with pytest.raises(ValueError):
        groups.add_group(opt, "host", extra.parameters(), 0.1)
    with pytest.raises(KeyError):
        groups.remove_group(opt, "seed")


def test_optimizer_state_round_trips_by_parameter_name_across_a_new_optimizer():
    model = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 2), "seed": nn.Linear(3, 2)})
    host = [*model["a"].parameters(), *model["b"].parameters()]
    opt = torch.optim.AdamW(host, lr=0.01)
    groups.add_group(opt, "layer#0", model["seed"].parameters(), lr=0.02)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(5, 3)
        (model["b"](model["a"](x)).sum() + model["seed"](x).sum()).backward()
        opt.step()
    saved = groups.export_state(opt, model)
    assert [g["name"] for g in saved["groups"]] == ["#0", "layer#0"]
    fresh = torch.optim.AdamW(host, lr=0.01)
    groups.add_group(fresh, "layer#0", model["seed"].parameters(), lr=0.02)
    groups.import_state(fresh, model, saved)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value)
    wrong = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="do not match"):
        groups.import_state(wrong, model, saved)
