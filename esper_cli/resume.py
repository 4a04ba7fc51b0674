"""`esper resume --checkpoint RUN_DIR|CHECKPOINT|s3://... [--strict] [--json] [key=value ...]`."""

from __future__ import annotations

import typer

from esper_cli import launching
from esper_cli.errors import reported
from esper_cli.train import JSON_HELP, fit_and_summarise


@reported
def resume(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A run directory (its newest verified checkpoint), "
                                   "one checkpoint directory, or s3://BUCKET/PREFIX/RUN[/checkpoints/NAME] (downloaded "
                                   "and verified first).", show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Refuse instead of falling back to an older checkpoint "
                                "when the chosen one fails verification."),
    overrides: list[str] = typer.Argument(None, help="Only trainer.max_steps, checkpoint.*, telemetry.* "
                                          "and distributed.* may change at resume.", show_default=False),
    no_factories: bool = typer.Option(False, "--no-factories", help="Refuse a run whose recipe names code to run "
                                      "(data/model factories, a custom loss); also ESPER_ALLOW_FACTORIES=0."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    nproc_per_node: int | None = launching.NPROC, nnodes: str = launching.NNODES, node_rank: int = launching.NODE_RANK,
    rdzv_backend: str = launching.RDZV_BACKEND, rdzv_endpoint: str | None = launching.RDZV_ENDPOINT,
    rdzv_id: str | None = launching.RDZV_ID, rdzv_join_timeout: int = launching.RDZV_JOIN_TIMEOUT,
) -> None:
    """Continue a run exactly where its checkpoint left it."""
    if nproc_per_node is not None:
        spec = launching.launch_spec(nproc_per_node, nnodes, node_rank, rdzv_backend, rdzv_endpoint,
                                     rdzv_id or launching.resumed_rendezvous_id(checkpoint), rdzv_join_timeout)
        launching.relaunch(spec, ["resume", "--checkpoint", checkpoint, *(["--strict"] if strict else []),
                                  *(["--no-factories"] if no_factories else []), *(["--json"] if as_json else []),
                                  *(overrides or [])])
    from esper_core.training.trainer import Trainer  # PyTorch loads only for commands that train

    trainer = Trainer.resume(checkpoint, overrides or [], strict=strict,
                             allow_factories=False if no_factories else None)
    fit_and_summarise(trainer, as_json, announce=f"resuming {trainer.run_dir} at step {trainer.step}")
