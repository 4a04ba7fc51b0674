"""`esper blueprints list [--dir DIR]...` and `esper blueprints show NAME [--in N] [--out N] [--rank N]`.

``show`` resolves the blueprint against an example host layer (a Linear 64 -> 32, or a 3x3
stride-1 Conv2d 16 -> 32 on an 8x8 grid, unless ``--in``/``--out`` say otherwise) with the same
resolver and cost model the compiler uses, so the sizes and counts shown are the ones a seed on
such a layer would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from esper_cli.console import Col, fitted_table, make_console
from esper_cli.errors import reported
from esper_core.errors import ConfigError, Problem

app = typer.Typer(name="blueprints", help="List the built-in blueprints, or show one resolved for an example host.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

EXAMPLE_HOSTS = {"linear": (64, 32), "conv2d": (16, 32)}
"""Default example host sizes (in, out) per host kind; conv hosts are 3x3, stride 1, padding 1."""
EXAMPLE_GRID = (8, 8)
DEFAULT_RANK = 8

_DIRS = typer.Option(None, "--dir", help="Also read blueprint YAML files from this directory (repeatable), as "
                     "seeds.blueprint_dirs does.", show_default=False)


@dataclass(frozen=True)
class Example:
    """One blueprint resolved on an example host: what ``show`` prints and ``--json`` returns."""

    name: str
    host: str
    host_label: str
    rank: int
    dims: dict[str, int]
    ops: list[dict[str, Any]]
    params: int
    flops_forward: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@app.command("list")
@reported
def list_blueprints(
    dirs: list[Path] = _DIRS,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the blueprints a recipe can name, with the parameters each adds on the example host."""
    library = _library(dirs)
    rows = []
    for name in library.names():
        loaded = library.get(name)
        example = resolve_example(loaded.blueprint, None, None, DEFAULT_RANK, loaded.problem)
        rows.append({"name": name, "host": loaded.blueprint.host, "version": loaded.blueprint.version,
                     "description": loaded.blueprint.description, "file": str(loaded.path),
                     "example_host": example.host_label, "example_params": example.params})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = make_console()
    table, _ = fitted_table("Blueprints", [Col("name"), Col("host"), Col("params", "right"), Col("description")],
                            [[r["name"], r["host"], f"{r['example_params']:,}", r["description"] or "-"] for r in rows],
                            console.width, caption=f"params: added on the example host at rank {DEFAULT_RANK}; "
                            "esper blueprints show NAME for details")
    console.print(table)


@app.command("show")
@reported
def show(
    name: str = typer.Argument(..., help="Blueprint name (see esper blueprints list).", show_default=False),
    in_size: int = typer.Option(None, "--in", min=1, help="Example host's input features/channels "
                                "[default: 64 for linear, 16 for conv2d].", show_default=False),
    out_size: int = typer.Option(None, "--out", min=1, help="Example host's output features/channels "
                                 "[default: 32].", show_default=False),
    rank: int = typer.Option(DEFAULT_RANK, "--rank", min=1, help="Value of the symbolic dim `rank` (seeds.rank)."),
    dirs: list[Path] = _DIRS,
    as_json: bool = typer.Option(False, "--json", help="Print the blueprint, its IR and the resolved example as "
                                 "JSON on stdout."),
) -> None:
    """Show a blueprint's YAML, dims and ops, resolved for an example host layer."""
    library = _library(dirs)
    try:
        loaded = library.get(name)
    except KeyError as exc:
        raise ConfigError(Problem("command line", str(exc.args[0]), field="NAME")) from None
    example = resolve_example(loaded.blueprint, in_size, out_size, rank, loaded.problem)
    yaml_text = loaded.path.read_text(encoding="utf-8")
    if as_json:
        print(json.dumps({"name": name, "file": str(loaded.path), "yaml": yaml_text,
                          "ir": json.loads(loaded.blueprint.canonical_json()), "example": example.to_json()}, indent=2))
        return
    console = make_console()
    console.print(f"# {loaded.path}", soft_wrap=True, markup=False, highlight=False)
    console.print(yaml_text.rstrip(), soft_wrap=True, markup=False, highlight=False)
    console.print()
    dims = ", ".join(f"{k} = {v}" for k, v in example.dims.items())
    for line in (f"host kind: {loaded.blueprint.host}", f"example host: {example.host_label}", f"dims: {dims}"):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    columns = [Col(c, "left" if c == "op" else "right") for c in ("#", "op", "in", "out", "kernel", "stride", "params",
                                                                  "FLOPs fwd")]
    rows = [[str(op["index"]), op["op"], _dash(op["in"]), _dash(op["out"]), op["kernel"] or "-", op["stride"] or "-",
             f"{op['params']:,}", f"{op['flops_forward']:,}"] for op in example.ops]
    table, _ = fitted_table("Ops, resolved", columns, rows, console.width, caption=f"total: {example.params:,} "
                            f"parameters, {example.flops_forward:,} forward FLOPs per sample")
    console.print(table)


def resolve_example(blueprint: Any, in_size: int | None, out_size: int | None, rank: int, locate: Any) -> Example:
    """Resolve ``blueprint`` on its example host (sizes overridable) and cost it per sample."""
    from esper_core.blueprints.builder import ResolveError, resolve
    from esper_core.blueprints.host import HostSpec
    from esper_core.compiler.flops import analytic_cost

    default_in, default_out = EXAMPLE_HOSTS[blueprint.host]
    width_in, width_out = in_size or default_in, out_size or default_out
    if blueprint.host == "linear":
        host, sample, label = HostSpec("linear", width_in, width_out), (width_in,), f"Linear({width_in}, {width_out})"
    else:
        host = HostSpec("conv2d", width_in, width_out, (3, 3), (1, 1), (1, 1))
        sample = (width_in, *EXAMPLE_GRID)
        label = f"Conv2d({width_in}, {width_out}, 3x3, stride 1, padding 1) on {EXAMPLE_GRID[0]}x{EXAMPLE_GRID[1]}"
    try:
        resolved = resolve(blueprint, host, rank)
    except ResolveError as exc:
        raise ConfigError(locate(exc)) from None
    cost = analytic_cost(resolved, sample)
    ops = []
    for op, op_cost in zip(resolved.ops, cost.ops):
        sized = op.kind in ("linear", "conv2d", "se_gate")
        spatial = op.kind in ("conv2d", "avg_pool")
        ops.append({"index": op_cost.index, "op": op.kind, "in": op.in_size if sized else None,
                    # an SE gate maps its channels to themselves; its out_size is the gate's hidden width
                    "out": (op.in_size if op.kind == "se_gate" else op.out_size) if sized else None,
                    "kernel": "x".join(map(str, op.kernel)) if spatial else None,
                    "stride": "x".join(map(str, op.stride)) if spatial else None,
                    "params": op_cost.params, "flops_forward": op_cost.forward})
    dims = {k: v for k, v in resolved.dims.items()}
    return Example(blueprint.name, blueprint.host, label, rank, dims, ops, cost.params, cost.forward)


def _library(dirs: list[Path] | None) -> Any:
    from esper_core.blueprints.library import BlueprintLibrary

    return BlueprintLibrary.discover(dirs or [])


def _dash(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
