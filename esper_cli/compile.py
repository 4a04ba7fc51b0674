"""`esper compile BLUEPRINT... [--for RECIPE] [--linear IN:OUT] [--conv1d IN:OUT:K:S:P[:L]]
[--conv2d IN:OUT:K:S:P[:HxW]] [--check] [--json]`.

Exit codes and the JSON report are documented in docs/compile.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from esper_cli.errors import reported
from esper_core.compiler.driver import compile_blueprints
from esper_core.compiler.kernels import DEVICE_CLASSES, DTYPES
from esper_core.compiler.options import plan_compile
from esper_core.compiler.pipeline import CompileFailed
from esper_core.compiler.report import CompileReport
from esper_core.compiler.store import LocalKernelStore
from esper_core.storage import open_kernel_store

CI_LOG_WIDTH = 160


@reported
def compile_(
    blueprints: list[Path] = typer.Argument(..., help="Blueprint YAML files.", show_default=False),
    recipe: Path = typer.Option(None, "--for", help="Compile for every host layer this recipe's seeds can "
                                "target; its seeds.rank, run.device, policy.max_added_params and "
                                "storage.workspace apply.", show_default=False),
    linear: list[str] = typer.Option(None, "--linear", help="A Linear target IN:OUT, e.g. 64:32 (repeatable).",
                                     show_default=False),
    conv1d: list[str] = typer.Option(None, "--conv1d", help="A Conv1d target IN:OUT:KERNEL:STRIDE:PADDING[:LENGTH], "
                                     "e.g. 16:32:3:1:1:40; the input length defaults to 16 (repeatable).",
                                     show_default=False),
    conv2d: list[str] = typer.Option(None, "--conv2d", help="A Conv2d target IN:OUT:KERNEL:STRIDE:PADDING[:HxW], "
                                     "e.g. 16:32:3:2:1:8x8; the input grid defaults to 8x8 (repeatable).",
                                     show_default=False),
    rank: int = typer.Option(None, "--rank", min=1, help="Value of the symbolic dim `rank` [default: the "
                             "recipe's seeds.rank, else 8]", show_default=False),
    dtype: str = typer.Option(None, "--dtype", help=f"One of {', '.join(DTYPES)} [default: float32]",
                              show_default=False),
    device: str = typer.Option(None, "--device", help=f"Device class, one of {', '.join(DEVICE_CLASSES)} "
                               "[default: the recipe's run.device, else cpu]", show_default=False),
    max_params: int = typer.Option(None, "--max-params", min=0, help="Parameter budget per kernel [default: "
                                   "the recipe's policy.max_added_params, else none]", show_default=False),
    max_flops: int = typer.Option(None, "--max-flops", min=0, help="Budget of training FLOPs (forward + "
                                  "backward) per sample per kernel [default: none]", show_default=False),
    store: Path = typer.Option(None, "--store", help="Kernel store directory [default: "
                               "<storage.workspace>/kernels, i.e. .esper/kernels]", show_default=False),
    check: bool = typer.Option(False, "--check", help="Build and validate only; read and write no store. A "
                               "blueprint with no target of its kind fails the check (exit 2)."),
    allow_skip: bool = typer.Option(False, "--allow-skip", help="With --check, let a blueprint with no target of "
                                    "its kind pass (it is reported as skipped)."),
    no_factories: bool = typer.Option(False, "--no-factories", help="Refuse a --for recipe that names user code "
                                      "(data.factory, model.factory) instead of running it; as ESPER_ALLOW_FACTORIES=0."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable report on stdout."),
) -> None:
    """Build, export, validate, characterise and store kernels: one per blueprint and target."""
    from esper_core.training.targets import recipe_targets  # builds the recipe's data and model

    plan = plan_compile(recipe=recipe, linear=linear or [], conv1d=conv1d or [], conv2d=conv2d or [], rank=rank,
                        dtype=dtype, device=device, max_params=max_params, max_flops=max_flops, store=store,
                        check=check,
                        targets_of=recipe_targets, allow_factories=False if no_factories else None)
    if plan.storage is not None:  # the recipe's (or the default) tiered cache: shared with the team
        kernel_store = open_kernel_store(plan.storage)
    else:
        kernel_store = None if plan.store_root is None else LocalKernelStore(plan.store_root)
    try:
        report = compile_blueprints(blueprints, plan.targets, store=kernel_store, budget=plan.budget,
                                    recipe=None if recipe is None else str(recipe), allow_skip=allow_skip)
    finally:
        if kernel_store is not None and hasattr(kernel_store, "close"):
            kernel_store.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        console = Console()
        # A CI log is not a terminal: rich would assume 80 columns and wrap every row.
        (console if console.is_terminal else Console(width=CI_LOG_WIDTH)).print(summary_table(report))
    if not report.ok:
        failure = CompileFailed(report.problems())
        failure.exit_code = report.exit_code  # 2 when a blueprint is invalid input, 1 when one failed to compile
        raise failure


def summary_table(report: CompileReport) -> Table:
    where = "check only, nothing stored" if report.check else f"store {report.store}"
    table = Table(title=f"Kernels ({where})")
    for column in ("blueprint", "target", "params", "FLOPs fwd+bwd", "latency", "address", "status"):
        table.add_column(column, justify="right" if column in ("params", "FLOPs fwd+bwd", "latency") else "left",
                         no_wrap=column != "target")
    for blueprint in report.blueprints:
        name = blueprint.name or blueprint.file
        if not blueprint.kernels:
            table.add_row(name, blueprint.skipped or "-", "", "", "", "", "skipped" if blueprint.skipped else "failed")
        for kernel in blueprint.kernels:
            row = kernel.to_json()
            flops = None if row["flops_forward"] is None else row["flops_forward"] + row["flops_backward"]
            table.add_row(name, row["target_label"], _count(row["params"]), _count(flops),
                          "-" if row["latency_ms"] is None else f"{row['latency_ms']:.3f} ms",
                          row["address"][:12], row["status"])
    table.caption = ", ".join(f"{n} {status}" for status, n in report.counts().items() if n) or "nothing compiled"
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
