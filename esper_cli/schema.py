"""`esper schema [--out FILE]`: the recipe JSON Schema, generated from the recipe's pydantic models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from esper_cli.errors import reported
from esper_core.durable import replace_atomically
from esper_core.errors import ConfigError, Problem
from esper_core.recipe.json_schema import recipe_json_schema


@reported
def schema(
    out: Path = typer.Option(None, "--out", help="Write the schema to this file [default: print it on stdout].",
                             show_default=False),
) -> None:
    """Write the recipe JSON Schema (for editors and validators)."""
    text = json.dumps(recipe_json_schema(), indent=2, sort_keys=True) + "\n"
    if out is None:
        print(text, end="")
        return
    try:
        replace_atomically(out, text.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(Problem(str(out), f"cannot write the schema: {exc.strerror or exc}", field="--out")) from None
    print(f"wrote {out}")
