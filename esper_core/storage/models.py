"""The asset repository's tables (SQLAlchemy 2.0 typed models).

Times are UNIX seconds as floats: the same in SQLite and PostgreSQL, and comparable without time
zone conversions. The schema itself is created and changed only by the Alembic migrations next to
this module; these models must match them (``tests/test_storage_repository.py`` checks that).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Double, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BlueprintRow(Base):
    """A blueprint, by the digest of its canonical IR (what a kernel's address depends on)."""

    __tablename__ = "blueprints"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class KernelRow(Base):
    """A registered kernel. ``envelope`` is the SQL cache tier's copy; NULL once evicted or quarantined,
    while the row (the kernel's history: when made, how often used) stays."""

    __tablename__ = "kernels"
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    blueprint_digest: Mapped[str] = mapped_column(ForeignKey("blueprints.digest"), index=True)
    blueprint: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(300))
    torch: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    envelope: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double)
    uses: Mapped[int] = mapped_column(BigInteger, default=0)


class QuarantineRow(Base):
    """A cache entry that failed verification, kept for inspection and never served."""

    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    address: Mapped[str] = mapped_column(String(64), index=True)
    tier: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Double)


class CounterRow(Base):
    """Hits, misses and integrity failures per cache tier, summed over every process that flushed."""

    __tablename__ = "cache_counters"
    tier: Mapped[str] = mapped_column(String(16), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    misses: Mapped[int] = mapped_column(BigInteger, default=0)
    integrity_failures: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Double)


class LeaseRow(Base):
    """Who is compiling a kernel now (when there is no Redis): a row lock with an expiry."""

    __tablename__ = "compile_leases"
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Double)


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    recipe_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[float] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)


class EventRow(Base):
    """One line of a run's hash-chained event log, verbatim. Append-only: the migrations install
    triggers that reject UPDATE and DELETE, so even a direct SQL edit fails loudly."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("run_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)
