"""Compile leases: when several processes miss the same kernel at once, one compiles it and the
others wait for its result instead of compiling it too.

The lock is a Redis key set with ``SET NX PX`` when Redis is reachable, else a row in the asset
repository's ``compile_leases`` table (an insert-or-ignore with an expiry: a row lock that survives
neither its TTL nor, being checked on every try, a crashed holder). Both expire, so a holder that
dies only delays the others by the TTL. If no lock can be taken at all (every tier down), or the
wait runs out, the caller compiles anyway: kernels are content-addressed and write-once, so a
duplicate compile wastes time but can never store a different kernel.

Usage (the :class:`~esper_core.compiler.service.CompileService` pattern)::

    with cache.lease(address) as lease:
        kernel = lease.kernel              # set: someone else compiled it meanwhile
        if kernel is None:                 # unset: ours to compile; others wait for our put
            kernel = compile_kernel(spec)
            cache.put(kernel)

or call ``lease.release()`` yourself after ``put`` when the compile finishes on another thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from esper_core.compiler.artifact import Kernel
from esper_core.storage.guard import TierUnavailable
from esper_core.storage.tiers import LeaseTier

log = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass
class CompileLease:
    """The outcome of :func:`acquire_lease`.

    ``kernel`` is set when the kernel turned up (someone else compiled it): use it, compile nothing.
    Otherwise the caller owns the compile; ``locked`` says whether others are held off meanwhile.
    """

    address: str
    kernel: Kernel | None = None
    locked: bool = False
    _release: Callable[[], None] | None = field(default=None, repr=False)
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> None:
        """Let others in (idempotent; never raises: an unreleased lease simply expires)."""
        if self._release is None or self._released.is_set():
            return
        self._released.set()
        try:
            self._release()
        except TierUnavailable as exc:
            log.info("compile lease of %s not released (%s); it expires by itself", self.address, exc)

    def __enter__(self) -> CompileLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(address: str, lookup: Callable[[], Kernel | None], tiers: Sequence[LeaseTier], *,
                  wait_s: float, ttl_s: float) -> CompileLease:
    """Return once ``address`` is in the cache (``lease.kernel``) or this caller may compile it.

    ``lookup`` is the cache's uncounted lookup; ``tiers`` the lease-capable tiers in preference
    order. Waits at most about ``wait_s`` for another holder; never raises for a tier that is down.
    """
    holder = uuid.uuid4().hex
    give_up = time.monotonic() + wait_s
    while True:
        kernel = lookup()
        if kernel is not None:
            return CompileLease(address, kernel)
        granted, busy = _take(address, holder, tiers, ttl_s)
        if granted is not None:
            release = _releaser(granted, address, holder)
            kernel = lookup()  # it may have been put between our lookup and our lock
            if kernel is not None:
                release()
                return CompileLease(address, kernel)
            return CompileLease(address, None, True, release)
        if not busy:
            return CompileLease(address)  # no tier can arbitrate: compile without a lock
        if time.monotonic() >= give_up:
            log.warning("kernel %s: still being compiled elsewhere after %.0f s; compiling it here too",
                        address, wait_s)
            return CompileLease(address)
        time.sleep(POLL_S)


def _take(address: str, holder: str, tiers: Sequence[LeaseTier], ttl_s: float) -> tuple[LeaseTier | None, bool]:
    """(the tier that granted the lease, or None; whether a reachable tier said someone holds it)."""
    for tier in tiers:
        try:
            if tier.guard.call(tier.try_lease, address, holder, ttl_s):
                return tier, False
            return None, True
        except TierUnavailable:
            continue
    return None, False


def _releaser(tier: LeaseTier, address: str, holder: str) -> Callable[[], None]:
    return lambda: tier.guard.call(tier.release_lease, address, holder)
