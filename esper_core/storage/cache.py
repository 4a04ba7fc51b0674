"""PersistentKernelCache: the tiered :class:`~esper_core.compiler.store.KernelStore`.

Lookups go memory -> Redis (optional) -> SQL -> disk and stop at the first verified hit, which is
promoted into every tier above it (memory at once, the remote tiers in the background so a hit never
waits for a write). ``put`` writes through every tier, the durable ones first. Each lower tier sits
behind a :class:`~esper_core.storage.guard.Guard` (deadline + circuit breaker), so a lookup costs
at most the sum of the remote deadlines plus local work, whatever the network does, and a tier
that is down is a miss there, never an error.

A bad entry in any tier is a miss: counted (``integrity_failures``), quarantined by the tier, and
(being a miss everywhere it is bad) recompiled by the caller and put back.

Per-process counters are in :meth:`stats`; per-kernel uses and per-tier totals are flushed to the
asset repository in batches (never per lookup) so ``esper inspect-cache`` can show them later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from esper_core.compiler.artifact import CorruptKernel, Kernel, is_address
from esper_core.compiler.store import LocalKernelStore, default_store_root
from esper_core.storage.disk_tier import DiskTier
from esper_core.storage.guard import Breaker, Guard, TierCounters, TierUnavailable
from esper_core.storage.lease import CompileLease, acquire_lease
from esper_core.storage.memory import MemoryTier
from esper_core.storage.records import TierCount
from esper_core.storage.repository import AssetRepository
from esper_core.storage.settings import StorageSettings
from esper_core.storage.sql_tier import SqlTier
from esper_core.storage.tiers import Outgoing, Tier

log = logging.getLogger(__name__)

FLUSH_EVERY = 256
"""Lookups between two background flushes of uses and counters to the repository."""
REPOSITORY_TIMEOUT_S = 15.0
"""How long a background database operation may wait for locks (callers wait only their deadline)."""


class PersistentKernelCache:
    """See the module docstring. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, memory: MemoryTier, tiers: Sequence[Tier], key: bytes | None = None) -> None:
        self.memory = memory
        self.tiers = list(tiers)
        self.key = key
        self.puts = 0
        self._memory_counters = TierCounters()
        self._lock = threading.Lock()
        self._uses: Counter[str] = Counter()
        self._flushed: dict[str, TierCount] = {}
        self._since_flush = 0
        if (sql := self.tier("sql")) is not None:  # connect and migrate now, off this thread
            sql.guard.open(lambda: sql.repository.engine)  # type: ignore[attr-defined]

    @classmethod
    def open(cls, settings: StorageSettings) -> PersistentKernelCache:
        """The standard tiers for ``settings``; contacts no server (connections are made lazily,
        the database's in the background)."""
        return cls(MemoryTier(settings.memory_bytes), build_tiers(settings), settings.signing_key)

    # --- KernelStore -------------------------------------------------------------------------------

    def get(self, address: str) -> Kernel | None:
        """The verified kernel from the highest tier that has a good copy, or ``None``."""
        kernel = self._lookup(address, count=True)
        self._maybe_flush()
        return kernel

    def put(self, kernel: Kernel) -> None:
        """Write through every tier (disk, SQL, Redis, memory). Raises ``OSError`` only when neither
        durable tier (disk, SQL) took it: then the kernel would be lost with this process."""
        outgoing = Outgoing(kernel, self.key)
        failures = []
        for tier in reversed(self.tiers):
            try:
                tier.guard.call(tier.save, outgoing)
            except TierUnavailable as exc:
                failures.append((tier.name, str(exc)))
        self.memory.put(kernel)
        with self._lock:
            self.puts += 1
        durable = {tier.name for tier in self.tiers} & {"disk", "sql"}
        if durable and durable <= {name for name, _ in failures}:
            reasons = "; ".join(reason for _, reason in failures)
            raise OSError(f"no durable tier could store kernel {kernel.address}: {reasons}")

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and is_address(address) and self._lookup(address, count=False) is not None

    def __iter__(self) -> Iterator[str]:
        """Addresses held by any reachable tier (each tier asked within its deadline)."""
        seen = set(self.memory.addresses())
        for tier in self.tiers:
            try:
                seen.update(tier.guard.call(tier.addresses))
            except TierUnavailable:
                continue
        return iter(sorted(seen))

    # --- beyond KernelStore ------------------------------------------------------------------------

    @property
    def root(self) -> Path | None:
        """The disk tier's directory (what ``esper compile`` reports as "the store")."""
        disk = self.tier("disk")
        return None if disk is None else disk.store.root  # type: ignore[attr-defined]

    @property
    def repository(self) -> AssetRepository | None:
        """The asset repository behind the SQL tier (runs and events go there too), if there is one."""
        sql = self.tier("sql")
        return None if sql is None else sql.repository  # type: ignore[attr-defined]

    @property
    def deadline_s(self) -> float:
        """The longest a lookup can wait on remote tiers: the sum of their deadlines."""
        return sum(tier.guard.deadline_s or 0.0 for tier in self.tiers)

    @property
    def notices(self) -> list[str]:
        """Outages and recoveries seen so far, one line each (also logged once, when they happen)."""
        return [notice for tier in self.tiers for notice in tier.guard.notices]

    def tier(self, name: str) -> Tier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)

    def evict(self, address: str) -> None:
        """Remove ``address`` from every reachable tier (a tier that is down keeps its copy)."""
        self.memory.evict(address)
        for tier in self.tiers:
            try:
                tier.guard.call(tier.remove, address)
            except TierUnavailable:
                continue

    def lease(self, address: str, wait_s: float = 120.0, ttl_s: float = 300.0) -> CompileLease:
        """Who compiles ``address``: see :func:`esper_core.storage.lease.acquire_lease`."""
        tiers = [tier for tier in self.tiers if hasattr(tier, "try_lease")]
        return acquire_lease(address, lambda: self._lookup(address, count=False), tiers,  # type: ignore[arg-type]
                             wait_s=wait_s, ttl_s=ttl_s)

    def stats(self) -> dict[str, Any]:
        """Counters since this cache was opened: per tier (hits, misses, integrity failures, errors,
        timeouts, calls skipped by an open breaker, slowest call, breaker state) and overall."""
        tiers: dict[str, dict[str, Any]] = {"memory": {**self._memory_counters.to_json(), "breaker": "closed",
                                                       "entries": len(self.memory), "bytes": self.memory.bytes,
                                                       "capacity_bytes": self.memory.capacity}}
        for tier in self.tiers:
            deadline = tier.guard.deadline_s
            tiers[tier.name] = {**tier.guard.counters.to_json(), "breaker": tier.guard.breaker.state,
                                "deadline_ms": None if deadline is None else deadline * 1000}
        hits = sum(t["hits"] for t in tiers.values())
        lookups = self._memory_counters.hits + self._memory_counters.misses
        return {"lookups": lookups, "hits": hits, "misses": lookups - hits,
                "hit_rate": hits / lookups if lookups else None, "puts": self.puts,
                "integrity_failures": sum(t["integrity_failures"] for t in tiers.values()), "tiers": tiers}

    def close(self) -> None:
        """Flush uses and counters (within the database deadline) and let go of every connection."""
        sql = self.tier("sql")
        if sql is not None:
            try:
                sql.guard.call(self._flush)
            except TierUnavailable as exc:
                log.info("kernel cache: usage counters not saved (%s)", exc)
        for tier in self.tiers:
            tier.guard.close()
            try:
                tier.close()
            except Exception as exc:  # closing a dead connection must not fail a finished run
                log.debug("closing the %s tier: %s", tier.name, exc)

    def __enter__(self) -> PersistentKernelCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------

    def _lookup(self, address: str, count: bool) -> Kernel | None:
        if not is_address(address):
            raise ValueError(f"not a kernel address: {address!r}")
        kernel = self.memory.get(address)
        self._note(self._memory_counters, kernel is not None, count)
        if kernel is not None:
            self._used(address, count)
            return kernel
        for depth, tier in enumerate(self.tiers):
            try:
                kernel = tier.guard.call(tier.load, address)
            except CorruptKernel:
                self._note(tier.guard.counters, False, count, corrupt=True)
                continue
            except TierUnavailable:
                continue
            self._note(tier.guard.counters, kernel is not None, count)
            if kernel is not None:
                self._promote(kernel, self.tiers[:depth])
                self._used(address, count)
                return kernel
        return None

    def _promote(self, kernel: Kernel, above: Sequence[Tier]) -> None:
        self.memory.put(kernel)
        outgoing = Outgoing(kernel, self.key)
        for tier in above:
            tier.guard.submit(tier.save, outgoing)

    def _note(self, counters: TierCounters, hit: bool, count: bool, corrupt: bool = False) -> None:
        if corrupt:  # counted even while polling for a lease: a bad entry is news whoever finds it
            with self._lock:
                counters.integrity_failures += 1
        if not count:
            return
        with self._lock:
            if hit:
                counters.hits += 1
            else:
                counters.misses += 1

    def _used(self, address: str, count: bool) -> None:
        if count:
            with self._lock:
                self._uses[address] += 1

    def _maybe_flush(self) -> None:
        with self._lock:
            self._since_flush += 1
            due = self._since_flush >= FLUSH_EVERY
            if due:
                self._since_flush = 0  # one flush per FLUSH_EVERY lookups, however slow the database
        sql = self.tier("sql")
        if due and sql is not None:
            sql.guard.submit(self._flush)

    def _flush(self) -> None:
        """Send the uses and counter increments since the last flush (taken first, so a flush that
        fails loses them rather than counting them twice)."""
        with self._lock:
            uses, self._uses = self._uses, Counter()
            current = {"memory": self._memory_counters, **{tier.name: tier.guard.counters for tier in self.tiers}}
            deltas = {}
            for name, counters in current.items():
                before = self._flushed.get(name, TierCount())
                now = TierCount(counters.hits, counters.misses, counters.integrity_failures)
                self._flushed[name] = now
                if now != before:
                    deltas[name] = TierCount(now.hits - before.hits, now.misses - before.misses,
                                             now.integrity_failures - before.integrity_failures)
        if (uses or deltas) and self.repository is not None:
            self.repository.record_usage(uses, deltas, time.time())


def build_tiers(settings: StorageSettings) -> list[Tier]:
    """Redis (when configured), SQL and disk, each behind its own guard; nothing is contacted yet."""

    def guard(name: str, deadline_s: float | None) -> Guard:
        return Guard(name, deadline_s, Breaker(settings.breaker_failures, settings.breaker_reset_s))

    tiers: list[Tier] = []
    if settings.redis_url:
        from esper_core.storage.redis_tier import RedisTier  # imports redis-py: only when configured

        tiers.append(RedisTier(settings.redis_url, guard("redis", settings.redis_deadline_s), settings.signing_key,
                               settings.namespace))
    repository = AssetRepository(settings.database_url, max(REPOSITORY_TIMEOUT_S, settings.database_deadline_s))
    tiers.append(SqlTier(repository, guard("sql", settings.database_deadline_s), settings.signing_key))
    tiers.append(DiskTier(LocalKernelStore(default_store_root(settings.workspace)), guard("disk", None)))
    return tiers
