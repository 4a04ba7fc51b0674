"""`esper train RECIPE [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from esper_cli import launching
from esper_cli.errors import reported
from esper_cli.progress import make_progress

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer


@reported
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(None, help="Overrides such as trainer.max_steps=200 seeds.per_layer=2.",
                                          show_default=False),
    no_factories: bool = typer.Option(False, "--no-factories", help="Refuse a recipe that names code to run "
                                      "(data/model factories, a custom loss) before importing anything; also "
                                      "ESPER_ALLOW_FACTORIES=0."),
    nproc_per_node: int | None = launching.NPROC, nnodes: str = launching.NNODES, node_rank: int = launching.NODE_RANK,
    rdzv_backend: str = launching.RDZV_BACKEND, rdzv_endpoint: str | None = launching.RDZV_ENDPOINT,
    rdzv_id: str | None = launching.RDZV_ID,
) -> None:
    """Train (and grow) a model as the recipe says."""
    allow = False if no_factories else None
    if nproc_per_node is not None:
        from esper_core.recipe.load import load_recipe

        spec = launching.launch_spec(nproc_per_node, nnodes, node_rank, rdzv_backend, rdzv_endpoint, rdzv_id)
        load_recipe(recipe, overrides or [], allow)  # a bad recipe stops here (exit 2), before any rank starts
        launching.relaunch(spec, ["train", str(recipe), *(overrides or []), *(["--no-factories"] if no_factories else [])])
    from esper_core.training.trainer import Trainer  # PyTorch loads only for commands that train

    trainer = Trainer.from_recipe(recipe, overrides or [], allow_factories=allow)
    fit_and_summarise(trainer, Console())


def fit_and_summarise(trainer: "Trainer", console: Console) -> None:
    """Train with the recipe's progress display, then print the summary table (train and resume); under
    torchrun only rank 0 shows either."""
    progress = make_progress(trainer.loaded.recipe.telemetry.progress, console) if trainer.leader else None
    try:
        summary = trainer.fit(progress)
    finally:
        if progress is not None:
            progress.close()
    if trainer.leader:
        console.print(summary_table(summary))


def summary_table(summary: dict) -> Table:
    table = Table(title=f"Run {summary['run_dir']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    metric = summary["metric"]
    rows = [
        ("steps", f"{summary['steps']}"),
        ("device", summary["device"]),
        (f"val {metric}", f"{summary[f'val_{metric}']:.4f}"),
        (f"test {metric}", f"{summary[f'test_{metric}']:.4f}"),
        ("params initial", f"{summary['params_initial']:,}"),
        ("params final", f"{summary['params_final']:,}"),
        ("seeds", ", ".join(f"{k} {v}" for k, v in summary["seeds"].items() if v) or "none"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
