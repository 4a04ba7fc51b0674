"""The compile pipeline: spec -> resolve -> cost and budget -> build -> validate -> export -> characterise -> package.

Cheap checks come first and stop the pipeline early: resolution and the analytic cost refuse a
width of 2**40 or a teraFLOP per sample before any tensor exists. Every failure becomes a
:class:`~esper_core.errors.Problem` located at the blueprint field to fix; with the blueprint's file
at hand (``source``) that includes the file and line.

The whole pipeline runs inside a forked RNG and seeds the kernel's weights from its address, so it
neither depends on nor disturbs the caller's random state, and recompiling gives the same weights.

It also runs with one intra-op thread: seeds are tiny, and on a busy 2-core machine OpenMP threads
waiting for each other made a compile ten times slower (3 s against 0.3 s). That setting is
process-wide, so do not call :func:`compile_kernel` from a thread of a training process: use
:class:`~esper_core.compiler.service.CompileService`, whose worker processes are single-threaded anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from esper_core.blueprints.builder import ResolvedBlueprint, ResolveError, build
from esper_core.blueprints.library import BlueprintFile
from esper_core.compiler.artifact import Kernel
from esper_core.compiler.budget import Budget, check_budget, check_host, check_limits
from esper_core.compiler.characterise import characterise
from esper_core.compiler.checks import Check, failed
from esper_core.compiler.export import check_program, export_program
from esper_core.compiler.flops import Cost, analytic_cost
from esper_core.compiler.gradients import check_gradient_flow
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.validate import (
    check_finite,
    check_germination,
    check_output_shape,
    check_param_count,
    check_zero_at_init,
)
from esper_core.errors import EsperError, Problem


class CompileFailed(EsperError):
    """A blueprint that does not compile for a target; one located problem per failed check."""

    exit_code = 1


@dataclass(frozen=True)
class Validation:
    checks: list[Check]
    trained: nn.Module
    """The kernel after the gradient probe's steps: non-zero outputs, for checks that would pass
    vacuously on a branch that outputs zero at init."""


def compile_kernel(spec: KernelSpec, budget: Budget = Budget(), source: BlueprintFile | None = None) -> Kernel:
    """Run every stage for ``spec``; return the packaged kernel or raise :class:`CompileFailed`."""
    resolved, cost = precheck(spec, budget, source)
    with _one_thread(), torch.random.fork_rng(devices=[torch.cuda.current_device()] if spec.device == "cuda" else []):
        module = build_stage(resolved, spec)
        validation = validate_stage(module, spec, cost)
        _stop_on(validation.checks, spec, source)
        export_check, program = export_stage(module, validation.trained, spec)
        _stop_on([export_check], spec, source)
        figures = characterise(module, spec, cost)
    return Kernel.package(spec, module, program, [*validation.checks, export_check], figures)


def precheck(spec: KernelSpec, budget: Budget = Budget(),
             source: BlueprintFile | None = None) -> tuple[ResolvedBlueprint, Cost]:
    """The checks that need no tensor: device class, dims, hard limits, budget (microseconds)."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise CompileFailed(locate(spec, None, "device class 'cuda' is not available on this machine", source))
    resolved = resolve_stage(spec, source)
    cost = analytic_cost(resolved, spec.sample_shape)
    _stop_on([check_host(spec), *check_limits(cost), *check_budget(cost, budget)], spec, source)
    return resolved, cost


def resolve_stage(spec: KernelSpec, source: BlueprintFile | None = None) -> ResolvedBlueprint:
    """Resolve symbolic dims for the target (plain integer arithmetic: nothing is allocated)."""
    try:
        return spec.resolve()
    except ResolveError as exc:
        raise CompileFailed(locate(spec, exc.field, exc.message, source)) from None


def build_stage(resolved: ResolvedBlueprint, spec: KernelSpec) -> nn.Module:
    """The module with weights seeded from the kernel's address, on the target's device and dtype."""
    torch.manual_seed(spec.init_seed())
    return build(resolved).to(device=torch.device(spec.device), dtype=spec.torch_dtype)


def validate_stage(module: nn.Module, spec: KernelSpec, cost: Cost) -> Validation:
    """Every validator of the built module (see :mod:`.validate` and :mod:`.gradients`)."""
    gradient, trained = check_gradient_flow(module, spec)
    checks = [check_param_count(module, cost), check_output_shape(module, spec), check_zero_at_init(module, spec),
              gradient, check_finite(module, spec),
              check_finite(trained, spec, "finite_trained", "after training steps"), check_germination(module, spec)]
    return Validation(checks, trained)


def export_stage(module: nn.Module, trained: nn.Module, spec: KernelSpec) -> tuple[Check, bytes]:
    """Export ``module`` and check the program against eager with ``trained``'s weights."""
    try:
        program = export_program(module, spec)
    except Exception as exc:  # torch.export raises many types; any of them means "does not export"
        return Check("export", False, f"torch.export failed: {str(exc).strip().splitlines()[0]}", "ops"), b""
    return check_program(program, trained, spec), program


def locate(spec: KernelSpec, field: str | None, message: str, source: BlueprintFile | None) -> Problem:
    """A problem at ``field`` of the blueprint, in its file when known, prefixed with the target.
    ``field=None`` is a problem with the target itself, so it names the file but no line."""
    text = f"[{spec.label()}] {message}"
    if source is None:
        return Problem(f"blueprint {spec.blueprint.name!r}", text, field=field)
    if field is None:
        return Problem(source.source, text)
    return source.problem(ResolveError(field, text))


def problems_of(checks: list[Check], spec: KernelSpec, source: BlueprintFile | None) -> list[Problem]:
    """One located problem per failed check."""
    return [locate(spec, check.field, f"{check.name}: {check.detail}", source) for check in failed(checks)]


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stop_on(checks: list[Check], spec: KernelSpec, source: BlueprintFile | None) -> None:
    problems = problems_of(checks, spec, source)
    if problems:
        raise CompileFailed(problems)
