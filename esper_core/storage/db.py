"""Engines for the asset repository: SQLite tuned for many writers, PostgreSQL with bounded waits,
and Alembic migrations applied once, under a lock, on first use.

SQLite: WAL (readers never wait for the writer), a busy timeout (writers queue instead of failing
with "database is locked") and ``BEGIN IMMEDIATE`` for write transactions. The last matters: a
deferred transaction that reads and then writes can hit a lock upgrade conflict that SQLite reports
at once, without waiting; taking the write lock up front makes writers simply queue.

Migrations: a process whose database is already at :data:`HEAD` pays one query and never imports
Alembic. Otherwise it migrates inside a write transaction (SQLite) or holding an advisory lock
(PostgreSQL), so sixteen processes starting on a fresh database create the schema exactly once.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection

HEAD = "0002"
"""The newest migration's revision (a test checks it against Alembic's head)."""
MIGRATIONS = Path(__file__).parent / "migrations"
WRITE = {"esper_write": True}
"""Execution options of a write transaction: ``engine.execution_options(**WRITE).begin()``."""
_MIGRATION_LOCK = 0x45535045_52444231  # pg_advisory_xact_lock key: "ESPERDB1"


def normalise_url(url: str | URL) -> URL:
    """A URL with a driver that is installed: plain ``postgresql://`` means psycopg 3 here.

    Raises ``ValueError`` for anything but SQLite and PostgreSQL (the dialects the idempotent
    inserts and the migration lock are written for) and for text that is not a URL.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError; its message quotes the URL, password included
        raise ValueError("not a database URL (expected sqlite:///PATH or postgresql://...)") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r} (use sqlite or postgresql)")
    return parsed


def make_engine(url: str | URL, timeout_s: float) -> Engine:
    """An engine whose waits (locks, connects, statements) end after about ``timeout_s``."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, timeout_s)
    return _postgres_engine(parsed, timeout_s)


def migrate(engine: Engine) -> None:
    """Bring the schema to :data:`HEAD`; safe to call from many processes at once."""
    if revision(engine) == HEAD:
        return
    from alembic import command  # only paid when a migration may be due
    from alembic.config import Config

    with engine.execution_options(**WRITE).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        if _revision(connection) == HEAD:  # another process migrated while we waited for the lock
            return
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def revision(engine: Engine) -> str | None:
    """The schema's revision, or ``None`` for a database that was never migrated."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _sqlite_engine(url: URL, timeout_s: float) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")  # first: the next one may wait
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable across crashes of the process, WAL-safe
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()
        # The events table's insert trigger (migration 0002) checks each line's digest with this.
        dbapi_connection.create_function("esper_sha256", 1, _sha256_hex, deterministic=True)

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("esper_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _sha256_hex(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _postgres_engine(url: URL, timeout_s: float) -> Engine:
    milliseconds = int(timeout_s * 1000)
    connect_args = {
        "connect_timeout": max(2, math.ceil(timeout_s)),  # libpq's minimum is 2 s; the caller's guard cuts sooner
        "tcp_user_timeout": milliseconds,  # a peer that vanished mid-call is given up on, not waited for
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    }
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True, pool_size=4, max_overflow=4)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {milliseconds}")
            cursor.execute(f"SET lock_timeout = {milliseconds}")
        dbapi_connection.commit()

    return engine
