"""Warnings that were missing or spurious (issue 11 item 18): a metrics endpoint bound beyond the
loopback interface, a disk tier that cannot store, and "sql: deadline missed" on a fresh local SQLite.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper_core.compiler.store import LocalKernelStore
from esper_core.recipe.schema import TelemetryConfig
from esper_core.storage.cache import PersistentKernelCache
from esper_core.storage.disk_tier import DiskTier
from esper_core.storage.guard import Breaker, Guard
from esper_core.storage.memory import MemoryTier
from esper_core.storage.repository import AssetRepository
from esper_core.storage.settings import sqlite_url
from esper_core.storage.sql_tier import SqlTier
from esper_core.telemetry.run import RunTelemetry, is_loopback


@pytest.mark.parametrize("bind, exposed", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_a_metrics_endpoint_beyond_loopback_is_warned_about_once(bind: str, exposed: bool, caplog) -> None:
    telemetry = RunTelemetry(TelemetryConfig(metrics_port=0, metrics_bind=bind), lambda event: None, dict)
    with caplog.at_level(logging.WARNING):
        url = telemetry.start()
    telemetry.stop()
    warnings = [r.getMessage() for r in caplog.records if "metrics endpoint" in r.getMessage()]
    assert len(warnings) == (1 if exposed else 0), warnings
    if exposed:
        assert url in warnings[0] and "telemetry.metrics_bind=0.0.0.0" in warnings[0]


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("::") and not is_loopback("10.0.0.1") and not is_loopback("metrics.example")


def guard(name: str, deadline_s: float | None) -> Guard:
    return Guard(name, deadline_s, Breaker(3, 30.0))


def test_a_disk_tier_that_cannot_store_says_so_once(tmp_path: Path, storage_kernels, caplog) -> None:
    root = tmp_path / "kernels"
    root.mkdir()
    (root / ".tmp").write_text("in the way")  # staging cannot be created (root ignores a read-only mode)
    repository = AssetRepository(sqlite_url(tmp_path))
    cache = PersistentKernelCache(MemoryTier(0), [SqlTier(repository, guard("sql", 5.0), None),
                                                  DiskTier(LocalKernelStore(root), guard("disk", None))])
    with caplog.at_level(logging.WARNING):
        for kernel in storage_kernels[:3]:
            cache.put(kernel)  # the SQL tier takes them: no error, but the user must hear about the disk
            assert cache.get(kernel.address) is not None
    cache.close()
    warnings = [r.getMessage() for r in caplog.records if "cannot be stored" in r.getMessage()]
    assert len(warnings) == 1 and str(root) in warnings[0], [r.getMessage() for r in caplog.records]


class SlowFirstConnection(AssetRepository):
    """A repository whose first connection and migration take 0.5 s, as on a loaded machine."""

    @property
    def engine(self):  # type: ignore[override]
        if self._engine is None:
            time.sleep(0.5)
        return super().engine


def test_a_slow_first_connection_is_not_a_missed_deadline(tmp_path: Path, caplog) -> None:
    repository = SlowFirstConnection(sqlite_url(tmp_path))
    sql = SqlTier(repository, guard("sql", 0.2), None)
    cache = PersistentKernelCache(MemoryTier(0), [sql])
    with caplog.at_level(logging.WARNING):
        assert cache.get("ab" * 32) is None  # a miss, answered by the tier after it opened
        sql.guard.call(lambda repo: repo.start_run("r", "run", "0" * 64), repository)  # the trainer's mirror
    cache.close()
    assert sql.guard.counters.timeouts == 0 and sql.guard.counters.errors == 0
    assert sql.guard.notices == [] and not [r for r in caplog.records if "deadline" in r.getMessage()]
    assert repository.has_run("r")


STUCK_CALL = """
import sys, threading
from esper_core.storage.guard import Breaker, Guard, TierUnavailable
guard = Guard("sql", deadline_s=0.2, breaker=Breaker(failures=1, reset_s=30.0))
try:
    guard.call(threading.Event().wait)  # a call that never returns: a hung server's connect
except TierUnavailable as exc:
    print("abandoned:", exc, flush=True)
guard.close()
"""


def test_a_call_stuck_in_a_hung_server_does_not_keep_the_process_alive() -> None:
    """The guard abandons a call at its deadline; the call's thread must then not hold up the end of
    the process (a pool that joins its threads at exit kept a finished run from returning to the
    shell for as long as libpq's connect timeout, and here, forever)."""
    root = Path(__file__).resolve().parents[1]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK_CALL], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0 and "abandoned: sql: deadline missed" in done.stdout, done.stderr
    assert time.monotonic() - started < 30
