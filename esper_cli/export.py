"""`esper export RUN --format pt2|safetensors|onnx [--merge/--no-merge] [--out DIR] [--json]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from esper_cli.errors import reported

if TYPE_CHECKING:  # `esper --help` must not import PyTorch, which the export package does
    from esper_core.export.plain import SeedAction


@reported
def export(
    run: str = typer.Argument(..., help="A run directory, or s3://BUCKET/PREFIX/RUN.", show_default=False),
    fmt: str = typer.Option("pt2", "--format", "-f", help="pt2 (torch.export program), safetensors (merged weights "
                            "+ architecture.json) or onnx."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Fold fossilized seeds that are exact linear maps "
                               "into their hosts."),
    out: Path = typer.Option(None, "--out", help="Output directory [default: RUN/exports/FORMAT, with --checkpoint "
                             "RUN/exports/FORMAT-step-N].", show_default=False),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Export this checkpoint (name or directory) instead "
                                   "of final/.", show_default=False),
    samples: int = typer.Option(512, "--samples", min=1, help="Held-out samples the outputs are compared on."),
    tolerance: float = typer.Option(None, "--tolerance", min=0.0, help="Accepted max |difference| per unit of "
                                    "output scale [default: 1e-5 for float32, 2e-2 for bfloat16].", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a run's trained model (merged weights, torch.export program or ONNX) and check its outputs."""
    from esper_core.export.run import export_run  # PyTorch loads only for commands that need it

    result = export_run(run, fmt, merge, out, checkpoint, samples, tolerance,
                        warn=lambda message: print(message, file=sys.stderr))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, Console())
    if not result["within_tolerance"]:
        print(f"error: the exported model differs from the trained one by {result['max_abs_diff']:.3g} "
              f"(tolerance {result['tolerance']:.3g})", file=sys.stderr)
        raise typer.Exit(1)


SEED_ACTIONS: dict[SeedAction, str] = {"widened": "widened into wider hosts", "merged": "merged",
                                       "branch": "kept as branches", "dropped": "left out"}
"""Each :data:`~esper_core.export.plain.SeedAction` as the summary line names it."""


def _print(result: dict, console: Console) -> None:
    params = result["parameters"]
    actions = [s["action"] for s in result["seeds"]]
    counts = ", ".join(f"{actions.count(action)} {label}" for action, label in SEED_ACTIONS.items())
    console.print(f"exported {result['source']} (step {result['step']}) as {result['format']} into {result['out']}",
                  soft_wrap=True)
    console.print(f"parameters: host {params['host']:,}, trained {params['trained']:,}, exported "
                  f"{params['exported']:,} (seeds: {counts})", soft_wrap=True)
    for file in result["files"]:
        console.print(f"  {file['path']}  {file['bytes']:,} bytes", soft_wrap=True)
    console.print(f"max |difference| against the trained model on {result['samples']} held-out samples: "
                  f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g})"
                  + ("; state dict keys are the original model's" if result["original_keys"] else ""), soft_wrap=True)
    for note in result["notes"]:
        console.print(note, soft_wrap=True, markup=False, highlight=False)
