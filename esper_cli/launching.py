"""The options ``esper train`` and ``esper resume`` share to start several ranks under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from esper_core.distributed.launch import Launch

NPROC = typer.Option(None, "--nproc-per-node", min=1, help="Train on N ranks of this node under torchrun (DDP; gloo on "
                     "the CPU, NCCL on CUDA); plain `torchrun ... -m esper_cli train` works too.", show_default=False)
NNODES = typer.Option("1", "--nnodes", help="Nodes taking part (torchrun's --nnodes); above 1 needs --rdzv-endpoint.")
NODE_RANK = typer.Option(0, "--node-rank", min=0, help="This node's rank (torchrun's --node-rank).")
RDZV_BACKEND = typer.Option("c10d", "--rdzv-backend", help="torchrun's rendezvous backend.")
RDZV_ENDPOINT = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous, the same on every node.",
                             show_default=False)
RDZV_ID = typer.Option(None, "--rdzv-id", help="The run's rendezvous id, the same on every node (default: the run "
                       "name and a hash of the resolved recipe, so nodes started with the same recipe and overrides "
                       "agree, and unrelated jobs at one endpoint never join each other).", show_default=False)
RDZV_JOIN_TIMEOUT = typer.Option(600, "--rdzv-join-timeout", min=1, help="Seconds a node waits at the rendezvous "
                                 "for the others before it gives up (exit 6; torchrun's join_timeout).")


def launch_spec(nproc: int, nnodes: str, node_rank: int, rdzv_backend: str, rdzv_endpoint: str | None,
                rdzv_id: str | None, rdzv_join_timeout: int = 600) -> "Launch":
    """The launch the options describe; refused inside a process torchrun already started."""
    from esper_core.distributed import launched
    from esper_core.distributed.launch import Launch
    from esper_core.errors import ConfigError, Problem

    if launched():
        raise ConfigError(Problem("command line", "--nproc-per-node inside a torchrun worker: torchrun already "
                                  "started the ranks; drop the option"))
    return Launch(nproc, nnodes, node_rank, rdzv_backend, rdzv_endpoint, rdzv_id, rdzv_join_timeout)


def rendezvous_id(name: str, text: str) -> str:
    """The default ``--rdzv-id``: ``name`` and a hash of ``text`` (the resolved recipe, or a resumed run's
    saved one). Every node computes it from the same recipe, so they still meet without the flag, while two
    unrelated jobs pointed at the same endpoint no longer join each other's rendezvous (the fixed id
    ``esper`` made them one job)."""
    import hashlib

    return f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def resumed_rendezvous_id(target: str) -> str | None:
    """The default ``--rdzv-id`` of ``esper resume --checkpoint TARGET`` (a run or one of its checkpoint
    directories): the run's name and a hash of its saved ``recipe.yaml``, which every node reads at the
    same path; ``None`` (torchrun gets ``esper``) when there is none here, e.g. an ``s3://`` run."""
    import io
    import os

    from esper_core.safe_read import UnsafeInput, open_regular

    path = Path(target)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    try:  # not a plain read: a FIFO there would block the launch forever (the ranks then name it)
        with os.fdopen(open_regular(run_dir / "recipe.yaml", follow_links=True), "rb") as handle:
            return rendezvous_id(run_dir.name, io.TextIOWrapper(handle, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, UnsafeInput):
        return None


def relaunch(spec: "Launch", command: list[str]) -> None:
    """Run ``command`` (``esper`` arguments) on the launch's ranks and exit with their exit code."""
    from esper_core.distributed.launch import launch

    raise typer.Exit(launch(spec, command))
