"""Every validator rejects a crafted bad blueprint, naming the file, the line and the field.

Where the IR cannot express the fault (it has no op that produces NaN, and the builder cannot build a
branch whose runtime shape disagrees with the analytic one), the validator is run directly on a
module that has the fault, and the failure is located in a real blueprint file through the same
path the pipeline uses (:func:`problems_of`).
"""

from __future__ import annotations

import resource
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from esper_core.blueprints.builder import build
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, BlueprintFile, load_blueprint
from esper_core.compiler import pipeline
from esper_core.compiler.budget import Budget
from esper_core.compiler.export import check_program, export_program
from esper_core.compiler.flops import analytic_cost
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.pipeline import CompileFailed, compile_kernel, problems_of, validate_stage
from esper_core.compiler.validate import check_finite, check_germination, check_output_shape
from esper_core.errors import ConfigError, Problem

LINEAR = HostSpec("linear", 64, 32)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nhost: linear\n" + textwrap.dedent(body))
    return path


def compile_file(path: Path, budget: Budget = Budget(), host: HostSpec = LINEAR, rank: int = 8) -> list[Problem]:
    source = load_blueprint(path)
    with pytest.raises(CompileFailed) as caught:
        compile_kernel(KernelSpec(source.blueprint, host, rank), budget, source)
    return caught.value.problems


def assert_located(problem: Problem, path: Path, line: int, field: str, *words: str) -> None:
    assert (problem.source, problem.line, problem.field) == (str(path), line, field), problem
    assert str(problem).startswith(f"{path}:{line}: {field}: ")
    for word in words:
        assert word in problem.message, problem.message


def test_wrong_output_shape_is_refused_at_resolution(tmp_path: Path) -> None:
    path = write(tmp_path, "wrong_out", """\
        ops:
          - {op: linear, in: in, out: rank, bias: false}
          - {op: linear, in: rank, out: 7, init: zeros}
        """)
    (problem,) = compile_file(path)
    assert_located(problem, path, 5, "ops.1", "ends with 7", "produces 32")


def test_output_shape_validator_catches_a_runtime_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter", """\
        ops:
          - {op: linear, in: in, out: out, init: zeros}
        """)
    source = load_blueprint(path)
    spec = KernelSpec(source.blueprint, LINEAR, 8)
    check = check_output_shape(nn.Sequential(nn.Linear(64, 31)), spec)
    assert not check.passed and "(1, 31)" in check.detail
    (problem,) = problems_of([check], spec, source)
    assert_located(problem, path, 3, "ops", "output_shape", "the host's is (1, 32)")


def test_nan_producing_weights_are_refused_and_located(tmp_path: Path) -> None:
    """The IR has no NaN-producing op, so the fault is put in the weights (as a corrupted or tampered
    weights file would): the finiteness and germination validators name the op that goes non-finite."""
    path = write(tmp_path, "poisoned", """\
        ops:
          - {op: linear, in: in, out: rank, bias: false}
          - {op: relu}
          - {op: linear, in: rank, out: out, bias: false, init: zeros}
        """)
    source = load_blueprint(path)
    spec = KernelSpec(source.blueprint, LINEAR, 8)
    module = pipeline.build_stage(spec.resolve(), spec)
    with torch.no_grad():
        module[0].weight[0, 0] = float("inf")
    checks = validate_stage(module, spec, analytic_cost(spec.resolve(), spec.sample_shape)).checks
    failures = {c.name: c for c in checks if not c.passed}
    assert {"finite", "germination"} <= set(failures)
    problems = problems_of([failures["finite"], failures["germination"]], spec, source)
    for problem in problems:
        assert_located(problem, path, 4, "ops.0", "non-finite" if "finite" in problem.message else "changed")


def test_finite_validator_on_a_module_that_makes_nan() -> None:
    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)  # NaN for every negative input

    spec = KernelSpec(load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint, HostSpec("linear", 8, 8), 2)
    check = check_finite(nn.Sequential(nn.Identity(), Log()), spec)
    assert not check.passed and check.field == "ops.1" and "random inputs" in check.detail


def test_non_function_preserving_init_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "nonzero", """\
        ops:
          - {op: linear, in: in, out: rank, bias: false}
          - op: linear
            in: rank
            out: out
            init: default
        """)
    (problem,) = compile_file(path)
    assert_located(problem, path, 8, "ops.1.init", "zero_at_init", "init: zeros")


def test_germination_validator_rejects_a_branch_that_overflows() -> None:
    spec = KernelSpec(load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint, HostSpec("linear", 4, 4), 2)
    branch = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        branch[0].weight.fill_(1e36)  # finite weights, infinite output on large inputs: blended in, the host goes inf
    check = check_germination(branch, spec)
    assert not check.passed and check.field == "ops.0" and "changed the host" in check.detail


def test_dead_parameters_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "dead", """\
        ops:
          - {op: linear, in: in, out: rank, bias: false, init: zeros}
          - {op: linear, in: rank, out: out, bias: false, init: zeros}
        """)
    (problem,) = compile_file(path)
    assert_located(problem, path, 4, "ops.0", "gradient_flow", "0.weight, 1.weight", "never receive")


def test_zero_last_layer_is_not_mistaken_for_a_dead_start() -> None:
    for name in ("lowrank_adapter", "wide_mlp"):
        spec = KernelSpec(load_blueprint(BUILTIN_DIR / f"{name}.yaml").blueprint, LINEAR, 8)
        check, trained = pipeline.check_gradient_flow(pipeline.build_stage(spec.resolve(), spec), spec)
        assert check.passed and "once the zero-initialised layer has moved" in check.detail
        assert torch.count_nonzero(trained(torch.ones(2, 64)))


@pytest.mark.parametrize("seed", range(12))
def test_a_one_unit_bottleneck_is_not_mistaken_for_dead(seed: int) -> None:
    """se_gate on a 4-channel host squeezes through one ReLU unit: whether it is on depends on the
    init, so the probe must try inputs of many scales and with channel means, as real features have."""
    spec = KernelSpec(load_blueprint(BUILTIN_DIR / "se_gate.yaml").blueprint,
                      HostSpec("conv2d", 4, 4, (3, 3), (1, 1), (1, 1)), 1)
    torch.manual_seed(seed)
    check, _ = pipeline.check_gradient_flow(build(spec.resolve()), spec)
    assert check.passed, check.detail


def test_over_budget_parameters_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "big", """\
        ops:
          - {op: linear, in: in, out: 4096}
          - {op: relu}
          - {op: linear, in: 4096, out: out, init: zeros}
        """)
    (problem,) = compile_file(path, Budget(max_params=100_000, params_from="policy.max_added_params"))
    assert_located(problem, path, 4, "ops.0", "budget.params", "397,344 parameters", "policy.max_added_params")


def test_unknown_op_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "unknown_op", """\
        ops:
          - {op: linear, in: in, out: rank}
          - {op: fancy, in: rank, out: out}
        """)
    with pytest.raises(ConfigError) as caught:
        load_blueprint(path)
    (problem,) = caught.value.problems
    assert_located(problem, path, 5, "ops.1.op", "'fancy'")


def test_unresolvable_dim_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "typo", """\
        ops:
          - {op: linear, in: in, out: widht}
          - {op: linear, in: widht, out: out, init: zeros}
        """)
    with pytest.raises(ConfigError) as refused:  # whatever the host: refused when the file is loaded
        load_blueprint(path)
    first, second = refused.value.problems
    assert_located(first, path, 4, "ops.0.out", "unknown dimension 'widht'")
    assert_located(second, path, 5, "ops.1.in", "unknown dimension 'widht'")


def test_width_2_to_the_40_is_refused_at_once_without_allocating(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, "huge", """\
        dims:
          hidden: 1099511627776
        ops:
          - {op: linear, in: in, out: hidden}
          - {op: linear, in: hidden, out: out, init: zeros}
        """)
    monkeypatch.setattr(pipeline, "build_stage", lambda *a: pytest.fail("built a module for a 2**40 width"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    (problem,) = compile_file(path)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000  # KiB: nothing large
    assert_located(problem, path, 4, "dims.hidden", "1099511627776")


def test_an_absurd_host_is_refused_before_allocating_it(monkeypatch) -> None:
    source = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml")
    monkeypatch.setattr(pipeline, "build_stage", lambda *a: pytest.fail("built a module for an absurd host"))
    started = time.perf_counter()
    (problem,) = compile_file(BUILTIN_DIR / "lowrank_adapter.yaml", host=HostSpec("linear", 2**20, 2**20))
    assert time.perf_counter() - started < 1.0
    assert (problem.source, problem.line, problem.field) == (source.source, None, None)  # the target is at fault
    assert "limits.host" in problem.message and "1,099,511,627,776 weights" in problem.message


def test_export_validator_catches_a_program_that_differs_from_eager() -> None:
    spec = KernelSpec(load_blueprint(BUILTIN_DIR / "wide_mlp.yaml").blueprint, HostSpec("linear", 6, 5), 2)
    torch.manual_seed(0)
    exported = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))  # same weights' names, other function
    check = check_program(export_program(exported, spec), other, spec)
    assert not check.passed and check.field == "ops" and "differs from eager" in check.detail
    assert check_program(export_program(exported, spec), exported, spec).passed


def test_every_builtin_blueprint_passes_every_validator() -> None:
    hosts = {"linear": LINEAR, "conv2d": HostSpec("conv2d", 8, 16, (3, 3), (2, 2), (1, 1)),
             "conv1d": HostSpec("conv1d", 8, 16, (5,), (2,), (2,), (1,))}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        source: BlueprintFile = load_blueprint(path)
        host = hosts[source.blueprint.host]
        kernel = compile_kernel(KernelSpec(source.blueprint, host, 4), source=source)
        assert all(entry["passed"] for entry in kernel.manifest["validation"].values()), path.name
