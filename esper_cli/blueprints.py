"""`esper blueprints list [--dir DIR]...` and `esper blueprints show NAME [--in N] [--out N] [--rank N]`.

``show`` resolves the blueprint against an example host layer (a Linear 64 -> 32, or a 3x3
stride-1 Conv2d 16 -> 32 on an 8x8 grid, unless ``--in``/``--out`` say otherwise) with the same
resolver and cost model the compiler uses, so the sizes and counts shown are the ones a seed on
such a layer would have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from esper_cli.console import Col, fitted_table, make_console
from esper_cli.errors import reported
from esper_core.blueprints.example import DEFAULT_RANK, resolve_example
from esper_core.errors import ConfigError, Problem

app = typer.Typer(name="blueprints", help="List the built-in blueprints, or show one resolved for an example host.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


_DIRS = typer.Option(None, "--dir", help="Also read blueprint YAML files from this directory (repeatable), as "
                     "seeds.blueprint_dirs does.", show_default=False)


@app.command("list")
@reported
def list_blueprints(
    dirs: list[Path] = _DIRS,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the blueprints a recipe can name, with the parameters each adds on the example host. A
    blueprint that does not resolve there (``h: rank - 10`` at the example's rank 8) is listed with the
    reason: it may well resolve at the ``seeds.rank`` and on the layers a recipe gives it."""
    from esper_core.blueprints.resolve import ResolveError

    library = _library(dirs)
    rows = []
    for name in library.names():
        loaded = library.get(name)
        row = {"name": name, "host": loaded.blueprint.host, "version": loaded.blueprint.version,
               "description": loaded.blueprint.description, "file": str(loaded.path)}
        try:
            example = resolve_example(loaded.blueprint, None, None, DEFAULT_RANK)
        except ResolveError as exc:
            rows.append(row | {"example_host": None, "example_params": None, "example_error": str(loaded.problem(exc))})
            continue
        rows.append(row | {"example_host": example.host_label, "example_params": example.params, "example_error": None})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = make_console()
    table, _ = fitted_table("Blueprints", [Col("name"), Col("host"), Col("params", "right"), Col("description")],
                            [[r["name"], r["host"], "-" if r["example_params"] is None else f"{r['example_params']:,}",
                              _described(r)] for r in rows],
                            console.width, caption=f"params: added on the example host at rank {DEFAULT_RANK}; "
                            "esper blueprints show NAME [--rank N] for details")
    console.print(table)


def _described(row: dict[str, Any]) -> str:
    """A row's description, or why its example did not resolve."""
    if row["example_error"] is not None:
        return f"does not resolve on the example host ({row['example_error']})"
    return row["description"] or "-"


@app.command("show")
@reported
def show(
    name: str = typer.Argument(..., help="Blueprint name (see esper blueprints list).", show_default=False),
    in_size: int = typer.Option(None, "--in", min=1, help="Example host's input features/channels "
                                "[default: 64 for linear, 16 for conv1d and conv2d].", show_default=False),
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
    example = _resolve(loaded, in_size, out_size, rank)
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


def _resolve(loaded: Any, in_size: int | None, out_size: int | None, rank: int) -> Any:
    """The example, or exit 2 locating the blueprint line that does not resolve."""
    from esper_core.blueprints.resolve import ResolveError

    try:
        return resolve_example(loaded.blueprint, in_size, out_size, rank)
    except ResolveError as exc:
        raise ConfigError(loaded.problem(exc)) from None


def _library(dirs: list[Path] | None) -> Any:
    from esper_core.blueprints.library import BlueprintLibrary

    return BlueprintLibrary.discover(dirs or [])


def _dash(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
