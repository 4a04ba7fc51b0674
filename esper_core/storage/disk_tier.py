"""The disk tier: the :class:`LocalKernelStore` (the artifact tier ``esper compile`` writes to).

Local and trusted as far as the filesystem is: entries are verified by their hashes, not signed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator

from esper_core.compiler.artifact import FILES, CorruptKernel, Kernel
from esper_core.compiler.store import LocalKernelStore
from esper_core.storage.guard import Guard
from esper_core.storage.tiers import Entry, Outgoing

log = logging.getLogger(__name__)


class DiskTier:
    name = "disk"

    def __init__(self, store: LocalKernelStore, guard: Guard) -> None:
        self.store, self.guard = store, guard
        self._store_failed = False

    def load(self, address: str) -> Kernel | None:
        """Like :meth:`LocalKernelStore.get`, but a corrupt entry raises (after quarantine) so the
        cache can count it."""
        if not self.store.path_for(address).is_dir():
            return None
        try:
            return self.store.read(address)
        except (OSError, CorruptKernel) as exc:
            self.store.quarantine(address, str(exc))
            raise CorruptKernel(str(exc)) from None

    def save(self, outgoing: Outgoing) -> None:
        """Store the kernel; a directory that cannot take it (read-only, full, not a directory) is said
        once, since reads from it keep succeeding and its breaker would never open to say so."""
        try:
            self.store.put(outgoing.kernel)
        except OSError as exc:
            if not self._store_failed:
                self._store_failed = True
                log.warning("warning: kernels cannot be stored in %s (%s): they are kept in the other tiers only, "
                            "and are compiled again where those are not shared", self.store.root,
                            exc.strerror or exc)
            raise

    def remove(self, address: str) -> None:
        """Rename the entry out of the way first (atomic), so no reader sees it half deleted."""
        staging = self.store.root / ".tmp" / f"{address}.evicted.{uuid.uuid4().hex}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.store.path_for(address), staging)
        except FileNotFoundError:
            return
        shutil.rmtree(staging, ignore_errors=True)

    def addresses(self) -> list[str]:
        return list(self.store)

    def entries(self) -> Iterator[Entry]:
        """Sizes from the files; created is the directory's time, last used its newest access time
        (as the filesystem keeps it: with ``noatime`` mounts that is the creation time)."""
        for address in self.store:
            directory = self.store.path_for(address)
            try:
                stats = [(directory / name).stat() for name in FILES]
                created = directory.stat().st_mtime
            except OSError:
                continue
            yield Entry(address, sum(s.st_size for s in stats), created, max(s.st_atime for s in stats))

    def verify(self) -> Iterator[tuple[str, str]]:
        for address in self.store:
            try:
                self.store.read(address)
            except (OSError, CorruptKernel) as exc:
                yield address, str(exc)

    def close(self) -> None:
        return None
