"""Ahead-of-time compilation of blueprint files for a list of targets (what ``esper compile`` runs).

Every blueprint is judged on its own: one that fails to load, resolve or validate is reported with
located problems and the others are still compiled and stored, so a CI log shows every broken
blueprint at once. Compiles run in this process, one after another: CI wants the answer, not the
training loop's latency guarantees (that is :class:`~esper_core.compiler.service.CompileService`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from esper_core.blueprints.library import BlueprintFile, load_blueprint
from esper_core.compiler.budget import Budget
from esper_core.compiler.pipeline import CompileFailed, compile_kernel, precheck
from esper_core.compiler.report import BlueprintResult, CompileReport, KernelResult
from esper_core.compiler.store import KernelStore
from esper_core.compiler.targets import Target
from esper_core.errors import ConfigError, Problem


def compile_blueprints(paths: Sequence[str | Path], targets: Sequence[Target], *, store: KernelStore | None,
                       budget: Budget = Budget(), recipe: str | None = None, allow_skip: bool = False) -> CompileReport:
    """Compile every blueprint for every target of its host kind. ``store=None`` is ``--check``:
    everything is built and validated, nothing is read from or written to a store."""
    results = [compile_file(path, targets, store, budget) for path in paths]
    return CompileReport(results, check=store is None, store=None if store is None else str(store.root), recipe=recipe,
                         allow_skip=allow_skip)


def compile_file(path: str | Path, targets: Sequence[Target], store: KernelStore | None,
                 budget: Budget) -> BlueprintResult:
    result = BlueprintResult(str(path))
    try:
        source = load_blueprint(path)
    except ConfigError as exc:
        result.problems.extend(exc.problems)
        result.loaded = False
        return result
    result.name = source.blueprint.name
    matching = [t for t in targets if t.serves(source.blueprint)]
    if not matching:
        kind = "" if source.blueprint.kind == "branch" else f" {source.blueprint.kind}"
        result.skipped = f"no {source.blueprint.host}{kind} target"
        return result
    result.kernels.extend(compile_target(source, target, store, budget) for target in matching)
    return result


def compile_target(source: BlueprintFile, target: Target, store: KernelStore | None,
                   budget: Budget) -> KernelResult:
    """One kernel: served from the store when a verified copy exists, else compiled (and stored)."""
    spec = target.spec(source.blueprint)
    started = time.perf_counter()
    try:
        precheck(spec, budget, source)  # a budget is not part of the address: apply it to stored kernels too
        cached = store.get(spec.address()) if store is not None else None
        if cached is not None:
            return KernelResult(spec, "cached", time.perf_counter() - started, cached.manifest)
        kernel = compile_kernel(spec, budget, source)
    except CompileFailed as exc:
        return KernelResult(spec, "failed", time.perf_counter() - started, problems=exc.problems)
    if store is None:
        return KernelResult(spec, "checked", time.perf_counter() - started, kernel.manifest)
    try:
        store.put(kernel)
    except OSError as exc:
        problem = Problem(str(store.root), f"cannot write kernel {kernel.address}: {exc}")
        return KernelResult(spec, "failed", time.perf_counter() - started, kernel.manifest, [problem])
    return KernelResult(spec, "compiled", time.perf_counter() - started, kernel.manifest)
