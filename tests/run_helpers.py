"""Helpers shared by the report and audit tests: a finished run, and `esper report` in-process."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from typer.testing import CliRunner, Result

from esper_cli.report import report
from esper_core import Trainer

_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_app.command("report")(report)


@_app.callback()
def _group() -> None:
    """Keep `report` a subcommand, as in `esper`."""


def esper_report(*args: str | Path) -> Result:
    return CliRunner().invoke(_app, ["report", *map(str, args)])


def finished_run(root: Path, recipe: str) -> Path:
    """Train ``recipe`` under ``root`` and return its run directory."""
    (root / "recipe.yaml").write_text(recipe, encoding="utf-8")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; two threads on a loaded two-core runner spin against each other
    try:
        summary = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}"]).fit()
    finally:
        torch.set_num_threads(before)
    return Path(summary["run_dir"])
