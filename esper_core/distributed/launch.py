"""``esper train|resume --nproc-per-node N``: torchrun underneath, as torchtune's ``tune run`` does.

The command runs torch's own elastic launcher (``torch.distributed.run``, what the ``torchrun``
executable is) in this process, with ``-m esper_cli`` and the same command as the script: the
workers are exactly what ``torchrun --nproc-per-node N -m esper_cli train ...`` would start. Rendezvous
on one node uses torchrun's ``--standalone`` (a free port, so runs never collide); several nodes pass
``--nnodes``, ``--node-rank`` and a rendezvous endpoint (``--rdzv-endpoint HOST:PORT``,
``--rdzv-id``, ``--rdzv-backend``), the same on every node.

torchrun itself exits 1 whatever went wrong in a worker; here the exit code of the first worker
that failed is passed on (2 for a recipe, 3 for a checkpoint, 128 + N for a signal), so scripts see
the same codes as from a single-process run. A worker that only lost contact with one that failed
(:class:`~esper_core.distributed.world.PeerLost`, exit 6) is a consequence, not the cause: the cause
is the worker that failed otherwise, and one killed by a signal (``kill -9``, the out-of-memory
killer), which could not say so itself, is named here in one line. Workers are not restarted
(``--max-restarts 0``): a run resumes from its checkpoint with ``esper resume``, never from its first
step.

Errors are shown once. Every rank checks the same recipe and builds the same data, so a mistake there
(``run.device: cuda`` on a machine without CUDA, a factory that does not import) is found by every
rank, and each printed the same line: N ranks, N copies. Under this launcher a worker hands its
``error: ...`` lines to it instead (a file per rank in a directory named by :data:`RELAY`), and once
the workers have ended the launcher prints each distinct line once: the lines of ranks that failed
for a reason of their own first, then those of ranks that only lost contact with them, each in rank
order. Plain ``torchrun`` has no such directory: its workers print their own lines, as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esper_core.distributed.world import PeerLost
from esper_core.errors import ConfigError, EsperError, Problem

if TYPE_CHECKING:
    from argparse import Namespace
    from collections.abc import Callable

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

RELAY = "ESPER_RANK_ERRORS"
"""The environment variable naming the directory where workers leave their error lines for the launcher."""


class RendezvousTimedOut(EsperError):
    """Fewer nodes than ``--nnodes`` joined the rendezvous within ``--rdzv-join-timeout``: the run never
    started. The code is a lost rank's: another node never came (:class:`PeerLost`'s exit 6)."""

    exit_code = PeerLost.exit_code


class RankKilled(EsperError):
    """A worker was killed by a signal the launcher did not send; exits 128 + the signal, as the
    worker did."""


@dataclass(frozen=True)
class Launch:
    """Where and how many ranks: torchrun's options of the same names."""

    nproc_per_node: int
    nnodes: str = "1"
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    join_timeout_s: int = 600  # torchrun's default join_timeout

    @property
    def run_id(self) -> str:
        """The rendezvous id every node must share."""
        return self.rdzv_id or "esper"

    @property
    def nodes(self) -> str:
        """How many nodes the rendezvous waits for (the lower bound of an elastic ``MIN:MAX``)."""
        return self.nnodes.split(":")[0]

    def waiting(self) -> str | None:
        """The line a node of a multi-node launch prints before it waits at the rendezvous, which may last
        until the other nodes start (``None`` on one node: nothing to wait for)."""
        if self.rdzv_endpoint is None or self.nodes == "1":
            return None
        return (f"waiting at the rendezvous {self.rdzv_endpoint} (id {self.run_id}) until "
                f"all {self.nodes} nodes have joined: start the same command on the other nodes (the same --nnodes, "
                "--rdzv-endpoint and --rdzv-id, each its own --node-rank); Ctrl-C stops, and the wait ends by itself "
                f"after {self.join_timeout_s} s (--rdzv-join-timeout)")

    def argv(self) -> list[str]:
        """torchrun's arguments for this launch (before the script)."""
        if self.nproc_per_node < 1:
            raise ConfigError(Problem("command line", f"must be at least 1, not {self.nproc_per_node}",
                                      field="--nproc-per-node"))
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}", "--max-restarts=0"]
        if self.rdzv_endpoint is None:
            if self.nnodes not in ("1", "1:1"):
                raise ConfigError(Problem("command line", "--nnodes above 1 needs --rdzv-endpoint HOST:PORT "
                                          "(the same on every node)"))
            return [*args, "--standalone"]
        if self.nnodes in ("1", "1:1") and self.rdzv_backend == "c10d":
            _check_endpoint_free(self.rdzv_endpoint)
        return [*args, f"--node-rank={self.node_rank}", f"--rdzv-backend={self.rdzv_backend}",
                f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.run_id}",
                f"--rdzv-conf=join_timeout={self.join_timeout_s}"]


RDZV_DEFAULT_PORT = 29400
"""The port torchrun's c10d rendezvous uses when ``--rdzv-endpoint`` names a host alone."""


def _check_endpoint_free(endpoint: str) -> None:
    """Refuse a single-node launch whose rendezvous port is already held on this machine.

    The one agent of a single-node run hosts the rendezvous store itself; when the port is taken, torchrun
    silently falls back to being a client of whatever holds it (another run's rendezvous, or any other
    program) and waits there, minutes at least (over 380 s measured, with no output). Several nodes on one
    machine (``--nnodes`` above 1) legitimately share one agent's store, so only a single node is checked. A
    host that is not this machine's cannot be bound and is left to torchrun."""
    host, _, port_text = endpoint.rpartition(":") if not endpoint.endswith("]") else (endpoint, "", "")
    if not host or not port_text.isdigit():
        host, port_text = endpoint, str(RDZV_DEFAULT_PORT)
    host = host.strip("[]")
    try:
        addresses = {info[4][0]: info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return  # torchrun says what is wrong with the host
    if not any(_binds(family, address, 0) for address, family in addresses.items()):
        return  # not an address of this machine: another host's store, torchrun's business
    # the store listens on every interface: a listener on any of them holds the port
    if not _binds(socket.AF_INET, "", int(port_text)):
        raise ConfigError(Problem("command line", f"port {port_text} is already in use on this machine (another "
                                  "run's rendezvous, or another program); torchrun would wait on it without a word: "
                                  "choose a free port, or leave --rdzv-endpoint out on a single node (a free port is "
                                  "then picked)", field="--rdzv-endpoint"))


def _binds(family: int, address: str, port: int) -> bool:
    """Whether this machine lets a socket bind ``address:port`` now (``False`` for an address that is
    not this machine's, or a port another socket listens on)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no owner
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def launch(spec: Launch, command: list[str]) -> int:
    """Run ``python -m esper_cli COMMAND`` on ``spec.nproc_per_node`` ranks of this node and wait;
    returns the exit code, or raises :class:`RankKilled` (see the module docstring); the workers' error
    lines are printed before either, each distinct line once."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*spec.argv(), "-m", "esper_cli", *command])
    # the workers report their own errors; torch-elastic's loggers carry their own levels (WARNING), so the
    # parent's is not enough: "W1202 ... api.py:753] Received 2 death signal, shutting down workers" at Ctrl-C
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # its "failed (exitcode: -9) local_rank: 1 (pid: ...) of binary: ..." line: RankKilled says it in Esper's words
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    relay = Path(tempfile.mkdtemp(prefix="esper-rank-errors-"))
    previous = os.environ.get(RELAY)
    os.environ[RELAY] = str(relay)  # the workers inherit this process's environment
    waiting = spec.waiting()
    if waiting is not None:  # torchrun itself says nothing while it waits, possibly for minutes
        print(waiting, file=sys.stderr, flush=True)
    try:
        return _run(run, args, relay, spec)
    finally:
        if previous is None:
            os.environ.pop(RELAY, None)
        else:
            os.environ[RELAY] = previous
        for line in relayed(relay):
            print(line, file=sys.stderr)
        shutil.rmtree(relay, ignore_errors=True)


def relay_error(lines: list[str], exit_code: int, consequence: bool = False) -> bool:
    """In a worker of :func:`launch`: leave ``lines`` (an error's ``error: ...`` lines), the exit code and
    whether the error is only a ``consequence`` of another rank's (:attr:`EsperError.consequence`) for the
    launcher to print once, and return ``True``; ``False`` anywhere else (the caller prints them itself)."""
    directory, rank = os.environ.get(RELAY), os.environ.get("RANK")
    if not directory or rank is None or not Path(directory).is_dir():
        return False
    try:
        temporary = Path(directory) / f".rank-{rank}.tmp"
        header = f"{exit_code} {CONSEQUENCE}" if consequence else str(exit_code)
        temporary.write_text("".join(f"{line}\n" for line in [header, *lines]), encoding="utf-8")
        temporary.replace(Path(directory) / f"rank-{rank}")  # whole or absent when the launcher reads it
    except OSError:
        return False
    return True


CONSEQUENCE = "consequence"
"""The word after a relayed exit code that marks the rank's error as a consequence of another's."""


def _reports(directory: Path) -> list[tuple[int, bool, list[str]]]:
    """(rank, consequence, lines) of every worker that left its error in ``directory``, in rank order."""
    files = sorted((path for path in directory.glob("rank-*") if path.name[5:].isdigit()),
                   key=lambda path: int(path.name[5:]))
    reports = []
    for path in files:
        header, *lines = path.read_text(encoding="utf-8").splitlines() or ["1"]
        reports.append((int(path.name[5:]), CONSEQUENCE in header.split()[1:], [line for line in lines if line]))
    return reports


def relayed(directory: Path) -> list[str]:
    """Every distinct line the workers left in ``directory``, each once: first those of ranks that failed
    for a reason of their own, then those of ranks that only lost contact with them (:class:`PeerLost`),
    each group in rank order, so the cause comes before its consequences."""
    reports = _reports(directory)
    causes = [line for _, consequence, lines in reports if not consequence for line in lines]
    consequences = [line for _, consequence, lines in reports if consequence for line in lines]
    return list(dict.fromkeys([*causes, *consequences]))


def _run(run: Callable[[Namespace], None], args: Namespace, relay: Path, spec: Launch) -> int:
    """torchrun's ``run(args)``, its failures turned into an exit code (see :func:`launch`); ``relay`` is
    where the workers left their errors."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    try:
        run(args)
    except RendezvousTimeoutError:  # torch's traceback otherwise
        raise RendezvousTimedOut(Problem("distributed", f"fewer than {spec.nodes} nodes joined the rendezvous "
                                         f"{spec.rdzv_endpoint} (id {spec.run_id}) within {spec.join_timeout_s} s "
                                         "(--rdzv-join-timeout): start the same command on every node, or wait "
                                         "longer")) from None
    except ChildFailedError as failed:
        rank, failure = _cause(failed, {rank for rank, consequence, _ in _reports(relay) if not consequence})
        code = failure.exitcode
        if code > 0:
            return code  # the worker said why itself
        signum = -code or signal.SIGTERM
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        killed = RankKilled(Problem("distributed", f"rank {rank} (pid {failure.pid}) was killed by {name}"
                                    + (" (kill -9, or the out-of-memory killer)" if signum == signal.SIGKILL else "")
                                    + ", so every rank stopped; a run that wrote a checkpoint continues from it with "
                                    "esper resume --checkpoint RUN_DIR and the same launch options"))
        killed.exit_code = 128 + signum
        raise killed from None
    except SignalException as stopped:  # Ctrl-C or SIGTERM to this launcher: the ranks got it passed on,
        return 128 + int(stopped.sigval)  # wrote their checkpoint and said so; no launcher traceback
    return 0


def _cause(failed: ChildFailedError, told: set[int]) -> tuple[int, ProcessFailure]:
    """(global rank, failure) of the worker that failed first for a reason of its own: the others then
    lose contact with it and stop with :class:`PeerLost`'s code, sometimes before torchrun notices it
    (failures carry whole-second timestamps, so the order the agent saw them in breaks ties). A worker
    that said why itself (``told``: it relayed an error that is no consequence) comes before one that was
    killed by a signal: torchrun signals the workers still running once one failed, and a worker stuck in
    its own code (:class:`~esper_core.distributed.world.RankStalled`) is still running then."""
    failures = failed.failures
    pool = ({rank: failure for rank, failure in failures.items() if rank in told}
            or {rank: failure for rank, failure in failures.items() if failure.exitcode != PeerLost.exit_code}
            or failures)
    rank = min(pool, key=lambda r: pool[r].timestamp)  # min keeps the first of equals: the agent's order
    return rank, pool[rank]
