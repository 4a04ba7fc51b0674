"""Compiler stages one at a time: spec and address, analytic cost, limits and budget, targets."""

from __future__ import annotations

import pytest
import torch

from esper_core.blueprints.builder import build
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.budget import Budget, check_budget, check_limits
from esper_core.compiler.flops import analytic_cost
from esper_core.compiler.kernels import KernelSpec, build_kernel
from esper_core.compiler.options import plan_compile
from esper_core.compiler.pipeline import build_stage
from esper_core.compiler.targets import parse_conv2d, parse_linear
from esper_core.seeds.probe import input_shapes
from esper_core.training.targets import recipe_targets
from esper_core.errors import ConfigError
from esper_core.recipe.load import load_recipe

LINEAR = HostSpec("linear", 64, 32)
CONV = HostSpec("conv2d", 16, 32, (3, 3), (2, 2), (1, 1))


def builtin(name: str):
    return load_blueprint(BUILTIN_DIR / f"{name}.yaml").blueprint


def test_address_covers_ir_and_every_target_field() -> None:
    base = KernelSpec(builtin("residual_conv"), CONV, 8)
    variants = [KernelSpec(builtin("dwsep_conv"), CONV, 8), KernelSpec(builtin("residual_conv"), CONV, 4),
                KernelSpec(builtin("residual_conv"), CONV, 8, dtype="bfloat16"),
                KernelSpec(builtin("residual_conv"), CONV, 8, device="cuda"),
                KernelSpec(builtin("residual_conv"), CONV, 8, input_shape=(16, 12, 12)),
                KernelSpec(builtin("residual_conv"), HostSpec("conv2d", 16, 32, (3, 3), (1, 1), (1, 1)), 8)]
    addresses = {base.address(), *(v.address() for v in variants)}
    assert len(addresses) == 1 + len(variants)
    assert base.address() == KernelSpec(builtin("residual_conv"), CONV, 8, input_shape=(16, 8, 8)).address()


def test_spec_json_round_trip_and_shapes() -> None:
    spec = KernelSpec(builtin("se_gate"), CONV, 8, input_shape=(16, 9, 7))
    assert spec.output_shape == (32, 5, 4)
    again = KernelSpec.from_json(spec.to_json())
    assert again == spec and again.address() == spec.address()
    assert KernelSpec(builtin("lowrank_adapter"), LINEAR, 8, input_shape=(5, 64)).output_shape == (5, 32)
    with pytest.raises(ValueError, match="cannot take samples"):
        KernelSpec(builtin("lowrank_adapter"), LINEAR, 8, input_shape=(63,))


def test_build_kernel_keeps_its_old_contract() -> None:
    module, address = build_kernel(KernelSpec(builtin("lowrank_adapter"), LINEAR, 4))
    assert sum(p.numel() for p in module.parameters()) == 64 * 4 + 4 * 32 and len(address) == 64


def test_build_stage_weights_depend_on_the_address_only() -> None:
    spec = KernelSpec(builtin("wide_mlp"), LINEAR, 8)
    torch.manual_seed(1)
    first = build_stage(spec.resolve(), spec)
    torch.manual_seed(2)
    second = build_stage(spec.resolve(), spec)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize("name,host,shape", [
    ("lowrank_adapter", LINEAR, (64,)), ("wide_mlp", LINEAR, (3, 64)), ("residual_conv", CONV, (16, 8, 8)),
    ("se_gate", CONV, (16, 11, 13)), ("dwsep_conv", CONV, (16, 8, 8))])
def test_analytic_cost_matches_the_built_module(name: str, host: HostSpec, shape: tuple[int, ...]) -> None:
    resolved = KernelSpec(builtin(name), host, 8, input_shape=shape).resolve()
    cost = analytic_cost(resolved, shape)
    module = build(resolved)
    assert cost.params == sum(p.numel() for p in module.parameters())
    assert cost.ops[-1].output_shape == tuple(module(torch.zeros(1, *shape)).shape[1:])
    assert 0 < cost.forward <= cost.backward <= 2 * cost.forward


def test_analytic_flops_of_a_linear_pair_by_hand() -> None:
    cost = analytic_cost(KernelSpec(builtin("lowrank_adapter"), LINEAR, 8).resolve(), (64,))
    assert cost.forward == 2 * (64 * 8 + 8 * 32)  # two bias-free matmuls, 2 FLOPs per multiply-add
    assert cost.backward == 2 * cost.forward


def test_limits_refuse_a_teraflop_conv_and_a_huge_input() -> None:
    host = HostSpec("conv2d", 1024, 1024, (9, 9), (1, 1), (4, 4))
    blueprint = Blueprint.model_validate({"name": "heavy", "host": "conv2d", "ops": [
        {"op": "conv2d", "in": "in", "out": "out", "geometry": "host", "init": "zeros"}]})
    cost = analytic_cost(KernelSpec(blueprint, host, 8).resolve(), (1024, 64, 64))
    checks = {c.name: c for c in check_limits(cost)}
    assert not checks["limits.flops"].passed and checks["limits.flops"].field == "ops.0"
    assert checks["limits.activation"].passed
    big = {c.name: c for c in check_limits(analytic_cost(KernelSpec(blueprint, host, 8).resolve(), (1024, 128, 128)))}
    assert not big["limits.activation"].passed and "the input" in big["limits.activation"].detail


def test_budget_blames_the_biggest_op() -> None:
    cost = analytic_cost(KernelSpec(builtin("wide_mlp"), LINEAR, 8).resolve(), (64,))
    (params,) = check_budget(cost, Budget(max_params=1000, params_from="policy.max_added_params"))
    assert not params.passed and params.field == "ops.0" and "policy.max_added_params" in params.detail
    assert all(c.passed for c in check_budget(cost, Budget(max_params=cost.params, max_flops=10**9)))
    assert check_budget(cost, Budget()) == []


def test_parse_command_line_targets() -> None:
    assert parse_linear("64:32").host == LINEAR
    conv = parse_conv2d("16:32:3:2:1:9x7")
    assert conv.host == CONV and conv.input_shape == (16, 9, 7)
    assert parse_conv2d("16:32:3:2:1").input_shape == (16, 8, 8)
    for bad in ("64", "64:0", "a:b", "64:32:1"):
        with pytest.raises(ConfigError, match="IN:OUT"):
            parse_linear(bad)
    with pytest.raises(ConfigError, match="empty output"):
        parse_conv2d("16:32:9:1:0:4x4")


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_targets_see_each_layers_real_input(tmp_path) -> None:
    path = write_recipe(tmp_path, "data: {source: digits, layout: image}\nmodel: {arch: cnn, channels: [4, 8]}\n"
                        "seeds: {targets: ['type:Conv2d'], rank: 4}\nrun: {device: cpu}\n")
    targets = recipe_targets(load_recipe(path))
    shapes = {(t.host.in_features, t.host.out_features, t.host.stride): t.input_shape for t in targets}
    assert shapes[(1, 4, (1, 1))] == (1, 8, 8)  # the stem sees the 1x8x8 digits
    assert shapes[(4, 8, (2, 2))] == (4, 8, 8) and shapes[(8, 8, (1, 1))] == (8, 4, 4)
    assert len(targets) == len(set(targets)) and all(t.rank == 4 and t.device == "cpu" for t in targets)


def test_input_shapes_does_not_disturb_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert input_shapes(model, ["0", "2"], torch.randn(2, 6)) == {"0": (6,), "2": (5,)}
    assert not model[0]._forward_pre_hooks and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_takes_budget_rank_and_store_from_the_recipe(tmp_path) -> None:
    path = write_recipe(tmp_path, "data: {source: wine}\nmodel: {widths: [16]}\nseeds: {rank: 3, "
                        "exclude: [head]}\npolicy: {max_added_params: 500}\nstorage: {workspace: ws}\n")
    plan = plan_compile(recipe=path, linear=["7:5"], targets_of=recipe_targets)
    assert [(t.host.in_features, t.host.out_features, t.rank) for t in plan.targets] == [(13, 16, 3), (7, 5, 3)]
    assert plan.budget == Budget(500, None, params_from="policy.max_added_params")
    assert plan.store_root is not None and plan.store_root.parts[-2:] == ("ws", "kernels")
    assert plan_compile(recipe=path, max_params=9, rank=2, check=True, targets_of=recipe_targets).budget.max_params == 9
    assert plan_compile(recipe=path, check=True, targets_of=recipe_targets).store_root is None


def test_plan_rejects_bad_options(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nothing to compile"):
        plan_compile()
    with pytest.raises(ConfigError, match="--dtype|float32"):
        plan_compile(linear=["4:4"], dtype="float8")
    path = write_recipe(tmp_path, "seeds: {targets: ['nothing.*']}\n")
    with pytest.raises(ConfigError) as caught:
        plan_compile(recipe=path, targets_of=recipe_targets)
    (problem,) = caught.value.problems
    assert problem.field == "seeds.targets.0" and problem.line == 1
