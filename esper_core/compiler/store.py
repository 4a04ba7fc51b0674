"""The kernel store: verified, write-once kernel artifacts on local disk.

:class:`KernelStore` is the interface a tiered cache (memory LRU, Redis, SQL) implements too: a
tier answers ``get`` with a verified :class:`Kernel` or ``None``, never with unverified bytes.

:class:`LocalKernelStore` keeps one directory per kernel, ``<root>/<aa>/<address>/``. A kernel is
written to a temporary directory under ``<root>/.tmp``, every file fsynced, then renamed into place
(atomic on POSIX), so a reader sees a whole kernel or none; an existing kernel is never overwritten.
Every read re-verifies the hashes; a kernel that fails (a flipped bit, a half-copied directory, an
edit, a file replaced by a link, a FIFO or a device) is moved to ``<root>/quarantine/`` for
inspection and reported as a miss, so the caller recompiles it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from esper_core.compiler.artifact import FILES, CorruptKernel, Kernel, is_address
from esper_core.durable import fsync_dir, write_synced
from esper_core.safe_read import UnsafeInput, read_regular

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 32
"""Largest kernel file read (4 GiB; a seed is a small module): a file padded to a terabyte is refused
instead of filling memory."""


class KernelStore(Protocol):
    def get(self, address: str) -> Kernel | None: ...
    def put(self, kernel: Kernel) -> None: ...
    def __contains__(self, address: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0


def default_store_root(workspace: str | Path) -> Path:
    """Where kernels live by default: ``<storage.workspace>/kernels``."""
    return Path(workspace) / "kernels"


class LocalKernelStore:
    """A :class:`KernelStore` on a local filesystem. Safe for concurrent readers and writers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.stats = StoreStats()

    def path_for(self, address: str) -> Path:
        if not is_address(address):
            raise ValueError(f"not a kernel address: {address!r}")
        return self.root / address[:2] / address

    def __contains__(self, address: object) -> bool:
        """Whether an entry exists (not verified: :meth:`get` verifies)."""
        return isinstance(address, str) and is_address(address) and (self.path_for(address) / FILES[0]).is_file()

    def __iter__(self) -> Iterator[str]:
        """Addresses of the stored entries, in no particular order."""
        if not self.root.is_dir():
            return
        for shard in self.root.iterdir():
            if len(shard.name) == 2 and shard.is_dir():
                yield from (entry.name for entry in shard.iterdir() if is_address(entry.name))

    def get(self, address: str) -> Kernel | None:
        """The verified kernel, or ``None`` for a miss (absent, or corrupt and now quarantined)."""
        directory = self.path_for(address)
        if not directory.is_dir():
            self.stats.misses += 1
            return None
        try:
            kernel = self.read(address)
        except (OSError, CorruptKernel) as exc:
            self.stats.misses += 1
            self.stats.corrupt += 1
            self.quarantine(address, str(exc))
            return None
        self.stats.hits += 1
        return kernel

    def read(self, address: str) -> Kernel:
        """The verified kernel at ``address``; :class:`CorruptKernel` (or ``OSError``) otherwise. Each
        file is read without following links or blocking, because the workspace may be shared: a FIFO
        put in a kernel's place would otherwise hang every run that looks the kernel up."""
        directory = self.path_for(address)
        files = {}
        for name in FILES:
            try:
                files[name] = read_regular(directory / name, MAX_FILE_BYTES)
            except UnsafeInput as exc:
                raise CorruptKernel(f"{name}: {exc}") from None
        return Kernel.from_files(address, files)

    def put(self, kernel: Kernel) -> None:
        """Write ``kernel`` unless a valid copy is already stored (write-once)."""
        final = self.path_for(kernel.address)
        if final.is_dir() and self.get(kernel.address) is not None:
            return
        staging = self.root / ".tmp" / f"{kernel.address}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            for name in FILES:
                write_synced(staging / name, kernel.files[name], exclusive=True)
            fsync_dir(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # not a lost race with another writer of the same kernel
                    raise
                return  # another writer put the same kernel first; theirs is as good as ours
            fsync_dir(final.parent)
            self.stats.writes += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def quarantine(self, address: str, reason: str) -> Path | None:
        """Move a bad entry aside (kept for inspection, never served); returns where it went."""
        source = self.path_for(address)
        target = self.root / "quarantine" / f"{address}.{time.time_ns()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return None  # another process quarantined it first
        (target / "REASON").write_text(reason + "\n", encoding="utf-8")
        log.warning("kernel %s failed verification (%s); quarantined in %s", address, reason, target)
        return target
