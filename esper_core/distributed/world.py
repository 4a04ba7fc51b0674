"""The process group of a run under ``torchrun``, and the few collectives Esper's growth needs.

``torchrun`` (or any launcher that sets the same variables) starts one process per rank with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment;
:func:`join` reads them and joins the default process group: NCCL when the run trains on CUDA (each
rank on ``cuda:LOCAL_RANK``), gloo on the CPU. A world of one process (plain ``esper train``, or
``torchrun --nproc-per-node 1``) is no world at all: :func:`join` returns ``None`` and the run takes the
single-process path unchanged.

Every collective here is called by every rank at the same point of the same code; the tensors are
moved to the group's device (CUDA for NCCL, the CPU for gloo) and back. Nothing is ever pickled:
``torch.distributed``'s object collectives unpickle what they receive, so text travels as UTF-8 bytes
in a tensor instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from esper_core.errors import ConfigError, EsperError, Problem

ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every worker; a world needs all of them."""

TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for a rank that does not arrive (a dead peer is usually noticed at once);
a recipe's ``distributed.timeout_s`` replaces it."""

ROLL_CALL_S = 10.0
"""Longest a rank whose collective timed out waits for the other waiting ranks to time out too (they
entered their collectives within about a step of each other), before naming the ranks that did not."""


class RanksDiverged(EsperError):
    """Ranks disagree about something that must be identical everywhere (a bug, or a non-shared
    kernel store on several nodes): stopping beats training replicas that no longer match."""


class PeerLost(EsperError):
    """A collective failed because another rank is gone: its process died (``kill -9``, the out-of-memory
    killer, a crash) or the connection to it broke. The run cannot go on with fewer ranks (the
    reductions and the data split depend on the world size), so every surviving rank stops with this
    exit code; ``esper --nproc-per-node`` then names the rank that died and exits with its code."""

    exit_code = 6
    consequence = True


class RankStalled(PeerLost):
    """A collective waited the whole timeout for ranks that are alive but never came (stuck in their own
    code, stopped, deadlocked). The waiting ranks say which, so it is the cause of the run's end, not a
    consequence of another rank's failure; the launcher then stops the stuck ranks itself."""

    consequence = False


_TRANSPORT_FAILURES = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                       "NCCL communicator was aborted", "ncclRemoteError")
"""What gloo's and NCCL's errors say when the other end of a collective is gone (they raise plain
RuntimeErrors, so their text is all there is to go by)."""


_TIMEOUTS = ("Timed out waiting", "Application timeout caused pair closure", "Watchdog caught collective operation "
             "timeout")
"""What gloo's and NCCL's errors say when a collective waited its whole timeout (gloo's first one names the
wait; the pair is then closed, and later collectives on it fail at once with the second)."""


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited the process group's whole timeout for a rank."""
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _TIMEOUTS)


def peer_lost(error: BaseException) -> str | None:
    """Why a collective failed, in a few words (gloo's ``Read error [HOST]:PORT: Connection reset by
    peer``), when ``error`` says a peer rank is gone; ``None`` for any other error."""
    if not isinstance(error, RuntimeError):
        return None
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(error, dist.DistError) and not any(marker in text for marker in _TRANSPORT_FAILURES):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../gloo/transport/tcp/pair.cc:537] " source location
    return text.split(". ")[0].rstrip(".") or type(error).__name__


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int
    local_rank: int
    size: int
    backend: str
    device: torch.device  # where this rank trains
    owned: bool = True  # this World joined the process group (and leaves it in close); False: the caller's group
    timeout: timedelta = TIMEOUT  # how long a collective waits for a rank

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the run's files and serves its events."""
        return self.rank == 0

    @property
    def _comm(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # --- collectives ------------------------------------------------------------------------------

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The average of ``tensor`` over the ranks (a new tensor on ``tensor``'s device, float32 or wider)."""
        work = tensor.detach().to(self._comm, dtype=torch.promote_types(tensor.dtype, torch.float32), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return (work / self.size).to(tensor.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor, same dtype and device)."""
        work = tensor.detach().to(self._comm, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def any(self, flag: bool | torch.Tensor) -> bool:
        """Whether ``flag`` is true on any rank."""
        return bool(self.largest(int(torch.as_tensor(flag))))

    def largest(self, value: int) -> int:
        """The largest of each rank's ``value`` (a small integer)."""
        work = torch.tensor(value, dtype=torch.int32, device=self._comm)
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return int(work)

    def any_tensor(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a boolean tensor) OR-ed over the ranks, on its own device, without a host read."""
        value = flag.detach().to(self._comm, dtype=torch.int32, copy=True)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.to(flag.device).bool()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``values`` (lengths may differ) concatenated in rank order."""
        flat = values.detach().reshape(-1).to(self._comm)
        lengths = [torch.zeros(1, dtype=torch.int64, device=self._comm) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([flat.numel()], dtype=torch.int64, device=self._comm))
        sizes = [int(n) for n in lengths]
        padded = torch.zeros(max(sizes), dtype=flat.dtype, device=self._comm)
        padded[:flat.numel()] = flat
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(values.device)

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (others pass anything, usually ``None``)."""
        data = (text or "").encode("utf-8") if self.leader else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._comm)
        dist.broadcast(size, src=0)
        buffer = torch.zeros(int(size), dtype=torch.uint8, device=self._comm)
        if self.leader and data:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode("utf-8")

    def gather_text(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order, on every rank (e.g. the metrics endpoint each bound)."""
        data = text.encode("utf-8")
        lengths = [int(n) for n in self.gather(torch.tensor([len(data)], dtype=torch.int64))]
        joined = bytes(self.gather(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                                   else torch.zeros(0, dtype=torch.uint8)).tolist())
        starts = [sum(lengths[:r]) for r in range(self.size)]
        return [joined[start:start + n].decode("utf-8") for start, n in zip(starts, lengths)]

    def differing(self, text: str) -> list[int]:
        """The ranks whose ``text`` differs from rank 0's (the same list on every rank; empty when all
        agree). Only a digest travels."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        differs = self.broadcast_text(digest) != digest
        flags = self.gather(torch.tensor([int(differs)], dtype=torch.int32))
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

    def check_same(self, text: str, what: str) -> None:
        """Raise :class:`RanksDiverged` on every rank unless ``text`` is identical on all of them (the
        same message everywhere, naming the ranks that differ, so the launcher can show it once)."""
        ranks = self.differing(text)
        if ranks:
            raise RanksDiverged(Problem("distributed", f"{what} differs between ranks ({describe_ranks(ranks)} "
                                        f"from rank 0)"))

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    @contextmanager
    def leader_first(self) -> Iterator[None]:
        """Rank 0 runs the block alone, then the others (e.g. rank 0 compiles kernels into the shared
        cache, the others then find them there)."""
        if not self.leader:
            self.barrier()
        yield
        if self.leader:
            self.barrier()

    def absent(self) -> list[int] | None:
        """After a collective timed out here: the ranks that did not arrive, the same list on every rank
        that waited (``None`` when the rendezvous store cannot say). The process group cannot tell which
        peer it waited for, and gloo's pair is closed after a timeout, so the roll call goes through the
        rendezvous store: every rank whose collective timed out checks in and waits (:data:`ROLL_CALL_S`
        at most) for the others; the ranks that never check in are the ones that never came."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(f"esper/waited/{self.rank}", "1")
            keys = {rank: f"esper/waited/{rank}" for rank in range(self.size)}
            deadline = time.monotonic() + min(ROLL_CALL_S, self.timeout.total_seconds())
            while True:
                absent = [rank for rank, key in keys.items() if not store.check([key])]
                if not absent or time.monotonic() >= deadline:
                    return absent
                time.sleep(0.1)
        except (RuntimeError, ValueError):  # the store is gone too (its host was the stuck rank)
            return None

    def close(self) -> None:
        """Leave the process group, if :func:`join` created it (a program that set it up keeps it)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def describe_ranks(ranks: list[int]) -> str:
    """``rank 1 differs`` or ``ranks 1, 3 differ``: the ranks :meth:`World.differing` found."""
    return f"rank {ranks[0]} differs" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} differ"


def launched() -> bool:
    """Whether this process is one of several ranks started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def join(device: torch.device, timeout: timedelta = TIMEOUT) -> World | None:
    """Join the run's process group from torchrun's environment (``None`` for a single process).
    ``device`` is the recipe's device: on CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL. A collective
    waits ``timeout`` for a rank before it fails (:func:`timed_out`)."""
    if not launched():
        return None
    missing = [name for name in ENVIRONMENT if not os.environ.get(name)]
    if missing:
        raise ConfigError(Problem("environment", f"WORLD_SIZE > 1 but {', '.join(missing)} unset: start "
                                  "distributed runs with torchrun or `esper train --nproc-per-node N`"))
    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(Problem("environment", f"LOCAL_RANK {local_rank} but only "
                                      f"{torch.cuda.device_count()} CUDA devices on this node"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        backend = "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=timeout,
                                **({"device_id": device} if backend == "nccl" else {}))
    elif dist.get_backend() != backend:
        raise ConfigError(Problem("environment", f"the process group uses {dist.get_backend()}, but training on "
                                  f"{device.type} needs {backend}"))
    return World(rank, local_rank, size, backend, device, owned, timeout)
