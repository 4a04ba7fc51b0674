"""What the cache's lower tiers (Redis, SQL, disk) have in common.

A tier answers ``load`` with a verified :class:`Kernel`, ``None`` (absent), or raises
:class:`CorruptKernel` after moving the bad entry aside (quarantine); it never hands out unverified
bytes. Shared tiers (Redis, SQL) store :mod:`envelopes <esper_core.storage.envelope>`;
:class:`EnvelopeTier` does their verification in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from esper_core.compiler.artifact import CorruptKernel, Kernel
from esper_core.storage.envelope import open_envelope, seal
from esper_core.storage.guard import Guard
from esper_core.storage.memory import kernel_bytes
from esper_core.storage.records import KernelInfo

log = logging.getLogger(__name__)


class Outgoing:
    """A kernel on its way into tiers; its envelope and registry record are computed once, when a
    tier first needs them (promotions compute them on the tier's thread, off the lookup path)."""

    def __init__(self, kernel: Kernel, key: bytes | None) -> None:
        self.kernel, self._key = kernel, key

    @cached_property
    def envelope(self) -> bytes:
        return seal(self.kernel, self._key)

    @cached_property
    def info(self) -> KernelInfo:
        return kernel_info(self.kernel)


def kernel_info(kernel: Kernel) -> KernelInfo:
    manifest = kernel.manifest
    blueprint = manifest["blueprint"]
    return KernelInfo(address=kernel.address, blueprint=blueprint["name"], blueprint_version=int(blueprint["version"]),
                      blueprint_digest=blueprint["digest"], target=kernel.spec.label(),
                      torch=manifest["versions"]["torch"], size_bytes=kernel_bytes(kernel))


@dataclass(frozen=True)
class Entry:
    """One stored entry, as ``esper inspect-cache`` lists it (times are UNIX seconds)."""

    address: str
    bytes: int
    created: float | None = None
    last_used: float | None = None


class Tier(Protocol):
    name: str
    guard: Guard

    def load(self, address: str) -> Kernel | None: ...
    def save(self, outgoing: Outgoing) -> None: ...
    def remove(self, address: str) -> None: ...
    def addresses(self) -> list[str]: ...
    def entries(self) -> Iterator[Entry]: ...
    def verify(self) -> Iterator[tuple[str, str]]: ...
    def close(self) -> None: ...


class LeaseTier(Tier, Protocol):
    """A tier that can also arbitrate who compiles a kernel."""

    def try_lease(self, address: str, holder: str, ttl_s: float) -> bool: ...
    def release_lease(self, address: str, holder: str) -> None: ...


class EnvelopeTier:
    """Base of the shared tiers: subclasses move bytes, this class decides whether to trust them."""

    name: str
    guard: Guard

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def fetch(self, address: str) -> bytes | None:
        raise NotImplementedError

    def quarantine(self, address: str, blob: bytes, reason: str) -> None:
        raise NotImplementedError

    def blobs(self) -> Iterator[tuple[str, bytes | None]]:
        raise NotImplementedError

    def load(self, address: str) -> Kernel | None:
        blob = self.fetch(address)
        if blob is None:
            return None
        try:
            return open_envelope(blob, address, self.key)
        except CorruptKernel as exc:
            self.quarantine(address, blob, str(exc))
            log.warning("kernel %s failed verification in the %s tier (%s); quarantined", address, self.name, exc)
            raise

    def verify(self) -> Iterator[tuple[str, str]]:
        """(address, reason) of every stored entry that fails verification (nothing is moved)."""
        for address, blob in self.blobs():
            if blob is None:
                yield address, "not a kernel entry: the key at its address holds another type of value"
                continue
            try:
                open_envelope(blob, address, self.key)
            except CorruptKernel as exc:
                yield address, str(exc)
