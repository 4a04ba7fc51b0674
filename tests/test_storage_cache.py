"""The tiered kernel cache against real Redis, PostgreSQL and SQLite: read-through and promotion,
write-through, tiers that die or never answer, poisoned shared entries, compile leases."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from conftest import PrivateRedis, free_port
from sqlalchemy import text

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.artifact import Kernel
from esper_core.compiler.driver import compile_blueprints
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.service import CompileService
from esper_core.compiler.targets import Target
from esper_core.errors import ConfigError
from esper_core.growth.kernels import KernelSupply
from esper_core.recipe.schema import StorageConfig
from esper_core.storage import open_kernel_store
from esper_core.storage.cache import PersistentKernelCache
from esper_core.storage.envelope import seal
from esper_core.storage.settings import StorageSettings, sqlite_url

KEY = "a-signing-key-of-32-bytes-length"
SLACK_S = 0.1  # "no cache call exceeds its deadline by more than 100 ms"


def settings(workspace: Path, **changes: object) -> StorageSettings:
    base = StorageSettings(workspace=workspace, database_url=sqlite_url(workspace))
    return replace(base, **changes)  # type: ignore[arg-type]


def unused_port_url(scheme: str, path: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}/{path}"


def eventually(condition: Callable[[], object], timeout_s: float = 10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout_s`` (promotions are fire-and-forget by design)."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def test_open_without_remote_tiers_is_cheap_and_works(tmp_path: Path, storage_kernels: list[Kernel]) -> None:
    started = time.perf_counter()
    cache = open_kernel_store(StorageConfig(workspace=str(tmp_path / "ws")), env={})
    assert time.perf_counter() - started < 0.25  # nothing contacted, nothing waited for
    assert [tier.name for tier in cache.tiers] == ["sql", "disk"]
    kernel = storage_kernels[0]
    assert cache.get(kernel.address) is None
    cache.put(kernel)
    assert cache.get(kernel.address) is kernel  # memory
    assert kernel.address in cache and list(cache) == [kernel.address]
    assert cache.root == tmp_path / "ws" / "kernels"
    stats = cache.stats()
    assert stats["lookups"] == 2 and stats["hits"] == 1 and stats["tiers"]["memory"]["hits"] == 1
    assert stats["tiers"]["sql"]["misses"] == 1 and stats["tiers"]["disk"]["misses"] == 1
    cache.close()
    reopened = open_kernel_store(StorageConfig(workspace=str(tmp_path / "ws")), env={})
    assert dict(reopened.get(kernel.address).files) == dict(kernel.files)
    assert reopened.stats()["tiers"]["sql"]["hits"] == 1
    reopened.close()


def test_environment_overrides_the_recipe_and_bad_values_are_located(tmp_path: Path) -> None:
    cfg = StorageConfig(workspace=str(tmp_path), redis_url="redis://recipe:6379/0", database_deadline_ms=250)
    resolved = StorageSettings.resolve(cfg, {"ESPER_REDIS_URL": "redis://env:6379/1",
                                             "ESPER_DATABASE_URL": "postgresql://u:secret@db/esper",
                                             "ESPER_SIGNING_KEY": KEY})
    assert resolved.redis_url == "redis://env:6379/1" and resolved.database_url == "postgresql://u:secret@db/esper"
    assert resolved.signing_key == KEY.encode() and resolved.database_deadline_s == 0.25
    assert StorageSettings.resolve(cfg, {}).redis_url == "redis://recipe:6379/0"
    assert StorageSettings.resolve(cfg, {}).database_url == sqlite_url(tmp_path)
    with pytest.raises(ConfigError) as bad_db:
        StorageSettings.resolve(cfg, {"ESPER_DATABASE_URL": "mysql://x@y/z"})
    assert "ESPER_DATABASE_URL" in str(bad_db.value) and "unsupported database" in str(bad_db.value)
    with pytest.raises(ConfigError, match=r"storage\.redis_url"):
        StorageSettings.resolve(StorageConfig(redis_url="http://nope"), {})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        StorageSettings.resolve(cfg, {"ESPER_SIGNING_KEY": "short"})


def test_every_remote_tier_unreachable_at_start(tmp_path: Path, storage_kernels: list[Kernel],
                                                caplog: pytest.LogCaptureFixture) -> None:
    env = {"ESPER_REDIS_URL": unused_port_url("redis", "0"),
           "ESPER_DATABASE_URL": unused_port_url("postgresql", "test")}
    caplog.set_level(logging.WARNING, logger="esper_core.storage")
    cache = open_kernel_store(StorageConfig(workspace=str(tmp_path)), env=env)
    for kernel in storage_kernels:
        started = time.perf_counter()
        assert cache.get(kernel.address) is None
        cache.put(kernel)
        assert time.perf_counter() - started < 2 * cache.deadline_s + SLACK_S
    cache.memory.clear()
    assert all(dict(cache.get(k.address).files) == dict(k.files) for k in storage_kernels)  # from disk
    stats = cache.stats()
    assert stats["tiers"]["redis"]["breaker"] == stats["tiers"]["sql"]["breaker"] == "open"
    assert stats["tiers"]["disk"]["hits"] == len(storage_kernels)
    outages = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outages) == 2 and any("redis" in m for m in outages) and any("sql" in m for m in outages)
    assert sorted(cache.notices) == sorted(outages)  # said once per tier, however many calls failed
    cache.close()


def test_esper_compile_driver_runs_on_the_cache_with_remote_tiers_unreachable(tmp_path: Path) -> None:
    env = {"ESPER_REDIS_URL": unused_port_url("redis", "0"),
           "ESPER_DATABASE_URL": unused_port_url("postgresql", "test")}
    target = Target(HostSpec("linear", 16, 8), (16,), rank=2)
    with open_kernel_store(StorageConfig(workspace=str(tmp_path)), env=env) as cache:
        first = compile_blueprints([BUILTIN_DIR / "lowrank_adapter.yaml"], [target], store=cache)  # type: ignore[arg-type]
        again = compile_blueprints([BUILTIN_DIR / "lowrank_adapter.yaml"], [target], store=cache)  # type: ignore[arg-type]
    assert first.ok and first.counts()["compiled"] == 1 and again.counts()["cached"] == 1
    assert first.store == str(tmp_path / "kernels")


def test_read_through_promotes_and_put_writes_through(tmp_path: Path, redis_url: str, redis_namespace: str,
                                                      postgres_url: str, storage_kernels: list[Kernel]) -> None:
    config = settings(tmp_path, redis_url=redis_url, database_url=postgres_url, namespace=redis_namespace)
    kernel = storage_kernels[1]
    client = redis.Redis.from_url(redis_url)
    with PersistentKernelCache.open(config) as cache:
        cache.put(kernel)
        assert client.exists(f"{redis_namespace}:kernel:{kernel.address}")
        assert cache.repository.envelope(kernel.address) is not None
        assert (tmp_path / "kernels" / kernel.address[:2] / kernel.address).is_dir()
    with PersistentKernelCache.open(config) as fresh:  # a new process: empty memory, same tiers
        assert dict(fresh.get(kernel.address).files) == dict(kernel.files)
        assert fresh.stats()["tiers"]["redis"]["hits"] == 1
        client.delete(f"{redis_namespace}:kernel:{kernel.address}")
        fresh.memory.clear()
        assert fresh.get(kernel.address) is not None and fresh.stats()["tiers"]["sql"]["hits"] == 1
        assert eventually(lambda: client.exists(f"{redis_namespace}:kernel:{kernel.address}"))  # promoted back up
        fresh.evict(kernel.address)
        assert fresh.get(kernel.address) is None and list(fresh) == []
    client.close()


def test_redis_stopped_mid_run(tmp_path: Path, private_redis: PrivateRedis, storage_kernels: list[Kernel]) -> None:
    """Redis is SIGKILLed while lookups and puts run: every call completes on the lower tiers within
    its deadline (+100 ms), the outage is announced once, and Redis is used again once it is back."""
    config = settings(tmp_path, redis_url=private_redis.url, redis_deadline_s=0.05, database_deadline_s=1.0,
                      breaker_failures=2, breaker_reset_s=0.3)
    cache = PersistentKernelCache.open(config)
    worst: list[float] = []
    stop = threading.Event()

    def workload() -> None:
        step = 0
        while not stop.is_set():
            kernel = storage_kernels[step % len(storage_kernels)]
            started = time.perf_counter()
            if step % 3 == 0:
                cache.put(kernel)
            else:
                cache.memory.evict(kernel.address)  # make every lookup go below memory
                found = cache.get(kernel.address)
                assert found is None or dict(found.files) == dict(kernel.files)
            worst.append(time.perf_counter() - started)
            step += 1

    worker = threading.Thread(target=workload)
    try:
        worker.start()
        time.sleep(0.4)
        private_redis.kill()
        time.sleep(0.8)
        private_redis.start()
        time.sleep(0.8)
    finally:
        stop.set()
        worker.join(timeout=10)
        if private_redis.process is None:
            private_redis.start()
    assert not worker.is_alive() and len(worst) > 30
    assert max(worst) <= cache.deadline_s + SLACK_S, f"slowest call {max(worst) * 1000:.0f} ms"
    redis_stats = cache.stats()["tiers"]["redis"]
    assert redis_stats["slowest_ms"] <= (0.05 + SLACK_S) * 1000
    assert redis_stats["errors"] + redis_stats["timeouts"] >= 2 and redis_stats["skipped"] > 0
    assert [n.split(" (")[0] for n in cache.notices] == ["kernel cache: the redis tier is unavailable",
                                                        "kernel cache: the redis tier is back"]
    kernel = storage_kernels[0]
    cache.put(kernel)
    cache.memory.clear()
    assert cache.get(kernel.address) is not None and cache.stats()["tiers"]["redis"]["breaker"] == "closed"
    cache.close()


class CreatesAFile:
    """A pickle payload: unpickling it creates ``path``. Nothing may ever unpickle it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_poisoned_shared_entries_are_misses_counted_quarantined_and_recompiled(
        tmp_path: Path, redis_url: str, redis_namespace: str, postgres_url: str) -> None:
    """Each poison sits in Redis and in the database while the disk copy is gone: the lookup is two
    counted, quarantined misses, the CompileService recompiles, and the put repairs both tiers."""
    blueprint = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint
    spec = KernelSpec(blueprint, HostSpec("linear", 20, 10), 3)
    marker = tmp_path / "pwned"
    config = settings(tmp_path / "ws", redis_url=redis_url, database_url=postgres_url, namespace=redis_namespace,
                      signing_key=KEY.encode())
    client = redis.Redis.from_url(redis_url)
    cache = PersistentKernelCache.open(config)
    repository = cache.repository
    with CompileService(cache, warm=False) as service:
        genuine = service.request(spec).result(timeout=120)
        address = genuine.address
        pickled = pickle.dumps(CreatesAFile(marker))
        poisons = {
            "random bytes": bytes(range(256)) * 40,
            "wrong signature": seal(genuine, b"not-the-key-but-long-enough"),
            "unsigned": seal(genuine, None),
            "pickle": pickled,
            "pickle in an envelope": b"ESPKE1\x00" + bytes(64) + pickled,
        }
        for round_, (name, poison) in enumerate(poisons.items(), start=1):
            client.set(f"{redis_namespace}:kernel:{address}", poison)
            with repository.engine.begin() as db:
                db.execute(text("UPDATE kernels SET envelope = :poison WHERE address = :address"),
                           {"poison": poison, "address": address})
            cache.tier("disk").remove(address)  # only the poisoned copies are left
            cache.memory.clear()
            kernel = service.request(spec).result(timeout=120)
            assert service.stats.compiled == 1 + round_, name  # it was a miss everywhere: recompiled
            assert kernel.address == address and kernel.manifest["ir"] == genuine.manifest["ir"], name
            stats = cache.stats()["tiers"]
            assert stats["redis"]["integrity_failures"] == stats["sql"]["integrity_failures"] == round_, name
            assert stats["redis"]["hits"] == round_ - 1 and stats["sql"]["hits"] == 0, name  # only repairs (below)
            assert client.get(f"{redis_namespace}:quarantine:{address}") == poison, name
            assert repository.quarantined()[-1][:2] == (address, "sql"), name
            cache.memory.clear()
            assert dict(cache.get(address).files) == dict(kernel.files), name  # repaired by the put
            assert cache.stats()["tiers"]["redis"]["hits"] == round_, name
    cache.close()
    assert not marker.exists()
    client.close()


def test_memory_tier_is_bounded_in_bytes(tmp_path: Path, storage_kernels: list[Kernel]) -> None:
    size = sum(len(b) for b in storage_kernels[0].files.values())
    cache = PersistentKernelCache.open(settings(tmp_path, memory_bytes=int(size * 2.5)))
    for kernel in storage_kernels:
        cache.put(kernel)
    assert cache.memory.bytes <= cache.memory.capacity and len(cache.memory) == 2
    assert cache.memory.addresses() == [k.address for k in storage_kernels[-2:]]  # least recently used left
    cache.close()


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis-lease", "database-lease"])
def test_concurrent_misses_compile_once(with_redis: bool, tmp_path: Path, storage_kernels: list[Kernel],
                                        request: pytest.FixtureRequest) -> None:
    """Four caches (as four processes would have: own connections, own memory) miss one kernel at
    once; one compiles it, the others wait for its put and get the same bytes."""
    changes: dict[str, object] = {}
    if with_redis:
        changes = {"redis_url": request.getfixturevalue("redis_url"),
                   "namespace": request.getfixturevalue("redis_namespace")}
    config = settings(tmp_path, **changes)
    kernel = storage_kernels[2]
    caches = [PersistentKernelCache.open(config) for _ in range(4)]
    compiled, results = [], []

    def run(cache: PersistentKernelCache) -> None:
        with cache.lease(kernel.address, wait_s=30) as lease:
            got = lease.kernel
            if got is None:
                assert lease.locked
                time.sleep(0.3)  # the compile
                compiled.append(cache)
                cache.put(kernel)
                got = kernel
        results.append(got)

    threads = [threading.Thread(target=run, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(compiled) == 1 and len(results) == 4
    assert all(dict(r.files) == dict(kernel.files) for r in results)
    for cache in caches:
        cache.close()


def test_a_lease_whose_holder_died_expires(tmp_path: Path, storage_kernels: list[Kernel]) -> None:
    kernel = storage_kernels[3]
    with PersistentKernelCache.open(settings(tmp_path)) as first, \
            PersistentKernelCache.open(settings(tmp_path)) as other:
        abandoned = first.lease(kernel.address, ttl_s=0.5)  # taken and never released: a crashed holder
        assert abandoned.locked
        started = time.monotonic()
        lease = other.lease(kernel.address, wait_s=10, ttl_s=5)
        assert lease.locked and lease.kernel is None and 0.4 < time.monotonic() - started < 5
        lease.release()


def test_a_key_of_another_type_in_redis_is_a_bad_entry_not_an_outage(tmp_path: Path, redis_url: str,
                                                                      redis_namespace: str,
                                                                      storage_kernels: list[Kernel]) -> None:
    """A hash where a kernel's string belongs made the whole Redis tier 'unreachable' (WRONGTYPE), so
    its entries went unchecked and `inspect-cache --verify` said 'all entries intact', exit 0."""
    from esper_core.storage.inspection import CorruptEntries, inspect_cache

    config = settings(tmp_path, redis_url=redis_url, namespace=redis_namespace)
    with PersistentKernelCache.open(config) as cache:
        cache.put(storage_kernels[0])
    stray = "b" * 64
    redis.Redis.from_url(redis_url).hset(f"{redis_namespace}:kernel:{stray}", "f", "v")
    with pytest.raises(CorruptEntries) as found:
        inspect_cache(config, verify=True)
    report = found.value.report  # type: ignore[attr-defined]
    assert [(t.name, t.reachable, t.entries) for t in report.tiers if t.name == "redis"] == [("redis", True, 1)]
    assert [(tier, address) for tier, address, _ in report.corrupt] == [("redis", stray)]


def test_a_key_that_is_not_utf8_in_redis_does_not_hide_the_tier_s_bad_entries(
        tmp_path: Path, redis_url: str, redis_namespace: str, storage_kernels: list[Kernel]) -> None:
    """One key under the kernel prefix whose name is not UTF-8 made listing the tier raise
    UnicodeDecodeError: the tier was reported unreachable, so a corrupted entry beside it went
    unchecked and `inspect-cache --verify` exited 0."""
    from esper_core.storage.inspection import CorruptEntries, inspect_cache

    config = settings(tmp_path, redis_url=redis_url, namespace=redis_namespace)
    kernel = storage_kernels[0]
    with PersistentKernelCache.open(config) as cache:
        cache.put(kernel)
    client = redis.Redis.from_url(redis_url)
    client.set(f"{redis_namespace}:kernel:".encode() + b"\xff\xfe", b"x")
    client.set(f"{redis_namespace}:kernel:{kernel.address}", seal(kernel, None)[:-1] + b"!")
    with pytest.raises(CorruptEntries) as found:
        inspect_cache(config, verify=True)
    report = found.value.report  # type: ignore[attr-defined]
    assert [(t.name, t.reachable, t.entries) for t in report.tiers if t.name == "redis"] == [("redis", True, 1)]
    assert [(tier, address) for tier, address, _ in report.corrupt] == [("redis", kernel.address)]


def test_a_kernel_compiled_for_a_run_is_one_lookup_and_one_miss_per_tier(tmp_path: Path) -> None:
    """A run's kernel supply looks the kernel up, misses, and has it compiled: the cache counts that as
    one lookup and one miss in each tier (the metrics' miss counters), not a second miss per tier from
    the compile service looking again."""
    cache = open_kernel_store(StorageConfig(workspace=str(tmp_path / "ws")), env={})
    spec = KernelSpec(load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint, HostSpec("linear", 20, 10), 3)
    supply = KernelSupply(cache)
    try:
        assert supply.wait([spec]) == {spec.address(): None}
    finally:
        supply.close()
    stats = cache.stats()
    assert stats["lookups"] == 1 and stats["misses"] == 1, stats
    assert stats["tiers"]["sql"]["misses"] == 1 and stats["tiers"]["disk"]["misses"] == 1, stats["tiers"]
    assert cache.get(spec.address()) is not None  # compiled and stored
    cache.close()
