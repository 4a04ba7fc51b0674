"""Model-based test of the tiered cache against a plain dict, on a real (private) Redis, SQLite and disk.

Operations: put, get, evict, corrupt an entry in one tier, Redis down (SIGKILL), Redis up (a fresh,
empty server), restart (a new cache over the same tiers: memory lost). The property: ``get``
returns exactly the bytes that were put under that address, or a miss, never other bytes; and it
must hit whenever the disk or the database copy is known to be intact (put, and neither evicted
nor corrupted there since), whatever else is corrupt and whether Redis is up. (Redis copies are
not tracked: whether a put reached Redis depends on its breaker, which the model does not see.)
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import ClassVar

import hypothesis.strategies as st
import redis
from conftest import PrivateRedis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from esper_core.compiler.artifact import WEIGHTS, Kernel
from esper_core.storage.cache import PersistentKernelCache
from esper_core.storage.settings import StorageSettings, sqlite_url

KERNELS = 3
TIERS = ("redis", "sql", "disk")
DAMAGE = ("random", "flip", "truncate")


def damage(data: bytes, how: str) -> bytes:
    if how == "random":
        return bytes((i * 131 + 7) % 256 for i in range(max(8, len(data) // 3)))
    if how == "flip":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        return bytes(flipped)
    return data[: len(data) // 2]


class CacheModel(RuleBasedStateMachine):
    kernels: ClassVar[list[Kernel]] = []
    server: ClassVar[PrivateRedis]

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="esper-model-"))
        if self.server.process is None:
            self.server.start()
        redis.Redis.from_url(self.server.url).flushall()
        size = sum(len(data) for data in self.kernels[0].files.values())
        self.config = StorageSettings(workspace=self.root, database_url=sqlite_url(self.root),
                                      redis_url=self.server.url, memory_bytes=int(size * 2.5),
                                      redis_deadline_s=0.05, database_deadline_s=10.0, breaker_failures=1,
                                      breaker_reset_s=0.05)
        self.cache = PersistentKernelCache.open(self.config)
        assert self.cache.repository.engine  # the schema exists before `corrupt` edits it directly
        self.stored: dict[str, Kernel] = {}
        self.intact: dict[str, set[str]] = {"disk": set(), "sql": set()}

    @rule(i=st.integers(0, KERNELS - 1))
    def put(self, i: int) -> None:
        kernel = self.kernels[i]
        self.cache.put(kernel)
        self.stored[kernel.address] = kernel
        for addresses in self.intact.values():
            addresses.add(kernel.address)

    @rule(i=st.integers(0, KERNELS - 1))
    def get(self, i: int) -> None:
        address = self.kernels[i].address
        got = self.cache.get(address)
        if got is None:
            assert not any(address in intact for intact in self.intact.values()), f"a miss despite {self.intact}"
        else:
            assert address in self.stored and dict(got.files) == dict(self.stored[address].files)

    @rule(i=st.integers(0, KERNELS - 1))
    def evict(self, i: int) -> None:
        self.cache.evict(self.kernels[i].address)
        for addresses in self.intact.values():
            addresses.discard(self.kernels[i].address)

    @rule(i=st.integers(0, KERNELS - 1), tier=st.sampled_from(TIERS), how=st.sampled_from(DAMAGE))
    def corrupt(self, i: int, tier: str, how: str) -> None:
        address = self.kernels[i].address
        if tier == "redis" and self.server.process is not None:
            client = redis.Redis.from_url(self.server.url)
            key = f"{self.config.namespace}:kernel:{address}"
            if (blob := client.get(key)) is not None:
                client.set(key, damage(blob, how))
            client.close()
        elif tier == "sql":
            with sqlite3.connect(self.root / "esper.db", timeout=10) as db:
                row = db.execute("SELECT envelope FROM kernels WHERE address = ?", (address,)).fetchone()
                if row and row[0] is not None:
                    db.execute("UPDATE kernels SET envelope = ? WHERE address = ?", (damage(row[0], how), address))
            db.close()
            self.intact["sql"].discard(address)
        elif tier == "disk":
            weights = self.root / "kernels" / address[:2] / address / WEIGHTS
            if weights.is_file():
                weights.write_bytes(damage(weights.read_bytes(), how))
            self.intact["disk"].discard(address)

    @precondition(lambda self: self.server.process is not None)
    @rule()
    def redis_down(self) -> None:
        self.server.kill()

    @precondition(lambda self: self.server.process is None)
    @rule()
    def redis_up(self) -> None:
        self.server.start()  # empty: a restarted cache server has lost everything

    @rule()
    def restart(self) -> None:
        self.cache.close()
        self.cache = PersistentKernelCache.open(self.config)

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.cache.stats()
        assert stats["hits"] + stats["misses"] == stats["lookups"]
        assert stats["hits"] <= stats["lookups"]

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.root, ignore_errors=True)


def test_cache_behaves_like_a_dict(private_redis: PrivateRedis, storage_kernels: list[Kernel]) -> None:
    CacheModel.kernels = storage_kernels[:KERNELS]
    CacheModel.server = private_redis
    run_state_machine_as_test(CacheModel, settings=settings(
        max_examples=30, stateful_step_count=20, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
