"""`esper sync RUN_DIR [--to s3://BUCKET/PREFIX] [--json]`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from esper_cli.errors import reported


@reported
def sync(
    run_dir: Path = typer.Argument(..., help="A local run directory.", show_default=False),
    to: str = typer.Option(None, "--to", help="s3://BUCKET/PREFIX [default: the run's storage.artifacts_url].",
                           show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Upload what is missing of a run to its artifact store (compared by sha256)."""
    from esper_core.artifacts.publish import sync_to_store

    result = sync_to_store(run_dir, to)
    if as_json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(f"{result.location}: {len(result.uploaded)} uploaded, {len(result.unchanged)} already there")
