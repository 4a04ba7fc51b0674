"""``esper train|resume --nproc-per-node N``: torchrun underneath, as torchtune's ``tune run`` does.

The command runs torch's own elastic launcher (``torch.distributed.run``, what the ``torchrun``
executable is) in this process, with ``-m esper_cli`` and the same command as the script: the
workers are exactly what ``torchrun --nproc-per-node N -m esper_cli train ...`` would start. Rendezvous
on one node uses torchrun's ``--standalone`` (a free port, so runs never collide); several nodes pass
``--nnodes``, ``--node-rank`` and a rendezvous endpoint (``--rdzv-endpoint HOST:PORT``,
``--rdzv-id``, ``--rdzv-backend``), the same on every node.

torchrun itself exits 1 whatever went wrong in a worker; here the exit code of the first worker
that failed is passed on (2 for a recipe, 3 for a checkpoint, 128 + N for a signal), so scripts see
the same codes as from a single-process run. Workers are not restarted (``--max-restarts 0``): a
run resumes from its checkpoint with ``esper resume``, never from its first step.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

from esper_core.errors import ConfigError, Problem


@dataclass(frozen=True)
class Launch:
    """Where and how many ranks: torchrun's options of the same names."""

    nproc_per_node: int
    nnodes: str = "1"
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def argv(self) -> list[str]:
        """torchrun's arguments for this launch (before the script)."""
        if self.nproc_per_node < 1:
            raise ConfigError(Problem("command line", f"--nproc-per-node must be at least 1, not {self.nproc_per_node}"))
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}", "--max-restarts=0"]
        if self.rdzv_endpoint is None:
            if self.nnodes not in ("1", "1:1"):
                raise ConfigError(Problem("command line", "--nnodes above 1 needs --rdzv-endpoint HOST:PORT "
                                          "(the same on every node)"))
            return [*args, "--standalone"]
        return [*args, f"--node-rank={self.node_rank}", f"--rdzv-backend={self.rdzv_backend}",
                f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id or 'esper'}"]


def launch(spec: Launch, command: list[str]) -> int:
    """Run ``python -m esper_cli COMMAND`` on ``spec.nproc_per_node`` ranks of this node and wait;
    returns the exit code (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*spec.argv(), "-m", "esper_cli", *command])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # the workers report their own errors
    try:
        run(args)
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 + (-code or signal.SIGTERM)
    except SignalException as stopped:  # Ctrl-C or SIGTERM to this launcher: the ranks got it passed on,
        return 128 + int(stopped.sigval)  # wrote their checkpoint and said so; no launcher traceback
    return 0
