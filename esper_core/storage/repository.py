"""The asset repository: blueprints, kernels, runs and their append-only events, in SQL.

SQLite in the workspace by default, PostgreSQL by URL. Every registration is idempotent on its
natural key (insert-or-ignore / ``ON CONFLICT DO NOTHING``, then read back), so any number of
processes can register the same kernel at once: one row results and every caller gets the same
record, never an IntegrityError or "database is locked" (see :mod:`esper_core.storage.db`).

This module imports neither torch nor the compiler: kernels arrive as plain :class:`KernelInfo`,
so tools and worker processes can use the repository cheaply.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Insert, Table, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from esper_core.errors import EsperError
from esper_core.storage.db import WRITE, make_engine, migrate
from esper_core.storage.models import BlueprintRow, CounterRow, EventRow, KernelRow, LeaseRow, QuarantineRow, RunRow
from esper_core.storage.records import EventRecord, KernelInfo, KernelRecord, TierCount


class RepositoryError(EsperError):
    """The repository refused a write that would rewrite history."""


class AssetRepository:
    """See the module docstring. Connects and migrates on first use (``migrate=False``: a reader that
    must not change the database, such as an audit); thread-safe."""

    def __init__(self, url: str, timeout_s: float = 15.0, migrate: bool = True) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.migrate = migrate
        self._engine: Any = None
        self._lock = threading.Lock()
        self._closes = 0  # close() calls so far: a connection attempt that overlapped one is given up

    @classmethod
    def for_workspace(cls, workspace: str | Path, timeout_s: float = 15.0) -> AssetRepository:
        from esper_core.storage.settings import sqlite_url  # the recipe schema: not needed by URL users

        return cls(sqlite_url(workspace), timeout_s)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def engine(self) -> Any:
        """The migrated engine (created and migrated on first access)."""
        with self._lock:
            if self._engine is None:
                closes = self._closes
                engine = make_engine(self.url, self.timeout_s)
                try:
                    if self.migrate:
                        migrate(engine)
                    if self._closes != closes:
                        raise ConnectionError("the asset repository was closed while it connected")
                except Exception:
                    engine.dispose()
                    raise
                self._engine = engine
            return self._engine

    def close(self) -> None:
        """Dispose of the engine. A first connection still being attempted is not waited for: a server
        that accepts connections and never answers holds it until libpq's connect timeout (15 s), which
        kept a finished run from returning; the attempt gives up its engine itself when it ends."""
        self._closes += 1
        if not self._lock.acquire(timeout=0.5):  # held for longer only by a connection attempt
            return
        try:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
        finally:
            self._lock.release()

    # --- kernels -----------------------------------------------------------------------------------

    def register_kernel(self, info: KernelInfo, envelope: bytes | None = None) -> KernelRecord:
        """Record ``info`` (and its blueprint) once; store ``envelope`` if the row has none. Idempotent."""
        now = time.time()
        with self._write() as db:
            db.execute(self._insert_ignore(BlueprintRow, "digest").values(
                digest=info.blueprint_digest, name=info.blueprint, version=info.blueprint_version, created_at=now))
            db.execute(self._insert_ignore(KernelRow, "address").values(
                address=info.address, blueprint_digest=info.blueprint_digest, blueprint=info.blueprint,
                target=info.target, torch=info.torch, size_bytes=info.size_bytes, envelope=envelope,
                created_at=now, last_used_at=None, uses=0))
            if envelope is not None:
                db.execute(update(KernelRow).where(KernelRow.address == info.address, KernelRow.envelope.is_(None))
                           .values(envelope=envelope))
            return self._record(db, info.address)  # type: ignore[return-value]

    def kernel(self, address: str) -> KernelRecord | None:
        with self.engine.connect() as db:
            return self._record(db, address)

    def kernels(self) -> list[KernelRecord]:
        """Every registered kernel, oldest first."""
        with self.engine.connect() as db:
            rows = db.execute(_RECORD.order_by(KernelRow.created_at)).all()
        return [KernelRecord(*row) for row in rows]

    def envelope(self, address: str) -> bytes | None:
        with self.engine.connect() as db:
            return db.execute(select(KernelRow.envelope).where(KernelRow.address == address)).scalar()

    def envelopes(self) -> Iterator[tuple[str, bytes]]:
        """(address, envelope) of every stored envelope, one row in memory at a time."""
        with self.engine.connect() as db:
            addresses = db.execute(select(KernelRow.address).where(KernelRow.envelope.is_not(None))).scalars().all()
        for address in addresses:
            blob = self.envelope(address)
            if blob is not None:
                yield address, blob

    def drop_envelope(self, address: str) -> bool:
        """Evict the SQL tier's copy (the kernel's row and history stay); whether there was one."""
        with self._write() as db:
            result = db.execute(update(KernelRow).where(KernelRow.address == address, KernelRow.envelope.is_not(None))
                                .values(envelope=None))
            return bool(result.rowcount)

    def quarantine(self, address: str, tier: str, reason: str, data: bytes | None,
                   drop_envelope: bool = False) -> None:
        """Keep a bad entry for inspection; with ``drop_envelope`` also stop serving the SQL tier's copy
        (only if it is still the bad one: a concurrent repair is not undone)."""
        with self._write() as db:
            db.execute(insert(QuarantineRow).values(address=address, tier=tier, reason=reason, data=data,
                                                     created_at=time.time()))
            if drop_envelope:
                db.execute(update(KernelRow).where(KernelRow.address == address, KernelRow.envelope == data)
                           .values(envelope=None))

    def quarantined(self) -> list[tuple[str, str, str]]:
        """(address, tier, reason) of every quarantined entry, oldest first."""
        with self.engine.connect() as db:
            rows = db.execute(select(QuarantineRow.address, QuarantineRow.tier, QuarantineRow.reason)
                              .order_by(QuarantineRow.id)).all()
        return [tuple(row) for row in rows]  # type: ignore[misc]

    def record_usage(self, uses: Mapping[str, int], counts: Mapping[str, TierCount], at: float) -> None:
        """Add batched per-kernel uses and per-tier counters (flushed by caches, not per lookup)."""
        with self._write() as db:
            for address, n in uses.items():
                db.execute(update(KernelRow).where(KernelRow.address == address)
                           .values(uses=KernelRow.uses + n, last_used_at=self._later(KernelRow.last_used_at, at)))
            for tier, count in counts.items():
                db.execute(self._insert_ignore(CounterRow, "tier").values(
                    tier=tier, hits=0, misses=0, integrity_failures=0, updated_at=at))
                db.execute(update(CounterRow).where(CounterRow.tier == tier).values(
                    hits=CounterRow.hits + count.hits, misses=CounterRow.misses + count.misses,
                    integrity_failures=CounterRow.integrity_failures + count.integrity_failures, updated_at=at))

    def counters(self) -> dict[str, TierCount]:
        with self.engine.connect() as db:
            rows = db.execute(select(CounterRow.tier, CounterRow.hits, CounterRow.misses,
                                     CounterRow.integrity_failures)).all()
        return {tier: TierCount(hits, misses, failures) for tier, hits, misses, failures in rows}

    # --- compile leases (used when there is no Redis) ------------------------------------------------

    def try_lease(self, address: str, holder: str, ttl_s: float) -> bool:
        """Take the compile lease of ``address`` unless someone else holds an unexpired one."""
        now = time.time()
        with self._write() as db:
            db.execute(delete(LeaseRow).where(LeaseRow.address == address, LeaseRow.expires_at < now))
            db.execute(self._insert_ignore(LeaseRow, "address").values(address=address, holder=holder,
                                                                       expires_at=now + ttl_s))
            owner = db.execute(select(LeaseRow.holder).where(LeaseRow.address == address)).scalar()
        return owner == holder

    def release_lease(self, address: str, holder: str) -> None:
        with self._write() as db:
            db.execute(delete(LeaseRow).where(LeaseRow.address == address, LeaseRow.holder == holder))

    # --- runs and events -------------------------------------------------------------------------------

    def start_run(self, run_id: str, name: str, recipe_sha256: str) -> None:
        """Record a run (idempotent: a resumed run keeps its first start time)."""
        with self._write() as db:
            db.execute(self._insert_ignore(RunRow, "id").values(id=run_id, name=name, recipe_sha256=recipe_sha256,
                                                                status="running", started_at=time.time(),
                                                                finished_at=None))

    def finish_run(self, run_id: str, status: str) -> None:
        with self._write() as db:
            db.execute(update(RunRow).where(RunRow.id == run_id).values(status=status, finished_at=time.time()))

    def append_event(self, run_id: str, line: str) -> EventRecord:
        """Store one line of the run's event log (a JSON object with ``seq``) verbatim.

        Re-appending the same line is a no-op (a retried write); a different line at a taken ``seq``
        raises :class:`RepositoryError`: history is never rewritten.
        """
        record = json.loads(line)
        seq, kind = int(record["seq"]), str(record.get("event", "event"))
        digest = hashlib.sha256(line.encode("utf-8")).hexdigest()
        with self._write() as db:
            db.execute(self._insert_ignore(EventRow, "run_id", "seq").values(
                run_id=run_id, seq=seq, kind=kind, line=line, sha256=digest, created_at=time.time()))
            stored = db.execute(select(EventRow.sha256).where(EventRow.run_id == run_id, EventRow.seq == seq)).scalar()
        if stored != digest:
            raise RepositoryError(f"run {run_id}: event seq {seq} is already recorded with different content")
        return EventRecord(run_id, seq, kind, line, digest)

    def has_run(self, run_id: str) -> bool:
        with self.engine.connect() as db:
            return db.execute(select(RunRow.id).where(RunRow.id == run_id)).first() is not None

    def events(self, run_id: str) -> list[EventRecord]:
        with self.engine.connect() as db:
            rows = db.execute(select(EventRow.run_id, EventRow.seq, EventRow.kind, EventRow.line, EventRow.sha256)
                              .where(EventRow.run_id == run_id).order_by(EventRow.seq)).all()
        return [EventRecord(*row) for row in rows]

    # --- internals -------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``, so writers queue on the busy timeout)."""
        with self.engine.execution_options(**WRITE).begin() as db:
            yield db

    def _insert_ignore(self, model: type, *keys: str) -> Insert:
        table: Table = model.__table__  # type: ignore[attr-defined]
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))

    def _later(self, column: Any, at: float) -> Any:
        """SQL for the later of ``column`` (maybe NULL) and ``at``: flushes from many processes interleave."""
        later = func.greatest if self.dialect == "postgresql" else func.max  # SQLite's two-argument max()
        return later(func.coalesce(column, 0.0), at)

    @staticmethod
    def _record(db: Connection, address: str) -> KernelRecord | None:
        row = db.execute(_RECORD.where(KernelRow.address == address)).first()
        return None if row is None else KernelRecord(*row)


_RECORD = select(KernelRow.address, KernelRow.blueprint, KernelRow.target, KernelRow.torch, KernelRow.size_bytes,
                 func.coalesce(func.length(KernelRow.envelope), 0), KernelRow.created_at, KernelRow.last_used_at,
                 KernelRow.uses)
