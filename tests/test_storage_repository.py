"""The asset repository on real SQLite and PostgreSQL: migrations, idempotent registration under
16 concurrent processes, append-only events."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from esper_core.storage.db import HEAD, MIGRATIONS, make_engine, migrate, revision
from esper_core.storage.models import Base
from esper_core.storage.records import KernelInfo
from esper_core.storage.repository import AssetRepository, RepositoryError

REPO = Path(__file__).resolve().parents[1]
INFO = KernelInfo(address="ab" * 32, blueprint="lowrank_adapter", blueprint_version=1, blueprint_digest="cd" * 32,
                  target="linear 64->32 @ 64 rank 8", torch="2.13.0", size_bytes=19_392)
WRITERS = 16

# One interpreter imports everything once, then forks WRITERS children (a fresh, single-threaded
# process forks safely). The children block on a pipe until the parent closes it, so they all start
# at once; each opens the repository (its first use, migration included, happens in all of them
# together) and registers the same kernel on its own connection.
WORKER = """
import json, os, sys
import alembic.command, alembic.config  # what a first use on a fresh database imports: paid once, here
from esper_core.storage.records import KernelInfo
from esper_core.storage.repository import AssetRepository
url, info, writers = sys.argv[1], KernelInfo(**json.loads(sys.argv[2])), int(sys.argv[3])
go_read, go_write = os.pipe()
out_read, out_write = os.pipe()
children = []
for _ in range(writers):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.read(go_read, 1)  # returns at EOF: when the parent closes its end
        try:
            reply = {"ok": AssetRepository(url).register_kernel(info, b"envelope-bytes").to_json()}
        except BaseException as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(out_write, (json.dumps(reply) + "\\n").encode())  # one write under PIPE_BUF: atomic
        os._exit(0)
    children.append(pid)
os.close(go_write)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
os.close(out_write)
with os.fdopen(out_read) as replies:
    print(json.dumps({"statuses": statuses, "replies": [json.loads(line) for line in replies]}))
"""


def register_concurrently(url: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", WORKER, url, json.dumps(INFO.__dict__), str(WRITERS)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["statuses"] == [0] * WRITERS and len(result["replies"]) == WRITERS
    return result["replies"]


def check_one_row_same_result(repository: AssetRepository, results: list[dict]) -> None:
    assert [r for r in results if "error" in r] == []
    records = [r["ok"] for r in results]
    assert all(record == records[0] for record in records)
    assert records[0]["address"] == INFO.address and records[0]["stored_bytes"] == len(b"envelope-bytes")
    with repository.engine.connect() as db:
        assert db.execute(text("SELECT count(*) FROM kernels")).scalar() == 1
        assert db.execute(text("SELECT count(*) FROM blueprints")).scalar() == 1
        assert db.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD


def test_sixteen_processes_register_one_kernel_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'esper.db'}"
    results = register_concurrently(url)  # a fresh file: the schema is created under the same contention
    check_one_row_same_result(AssetRepository(url), results)


def test_sixteen_processes_register_one_kernel_on_postgresql(postgres_url: str) -> None:
    results = register_concurrently(postgres_url)  # a fresh schema: migrated concurrently too
    repository = AssetRepository(postgres_url)
    check_one_row_same_result(repository, results)
    repository.close()


def test_head_is_alembic_head_and_models_match_the_migrations(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}", 5.0)
    assert revision(engine) is None
    migrate(engine)
    migrate(engine)  # a second call is a no-op
    assert revision(engine) == HEAD
    with engine.connect() as db:
        assert compare_metadata(MigrationContext.configure(db), Base.metadata) == []
        assert db.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert db.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    engine.dispose()


def test_registration_is_idempotent_and_keeps_history(tmp_path: Path) -> None:
    repository = AssetRepository.for_workspace(tmp_path)
    first = repository.register_kernel(INFO, b"one")
    assert repository.register_kernel(INFO, b"two") == first == repository.kernel(INFO.address)  # not replaced
    assert repository.envelope(INFO.address) == b"one"
    assert repository.drop_envelope(INFO.address) and repository.envelope(INFO.address) is None
    repaired = repository.register_kernel(INFO, b"three")  # an evicted envelope is stored again
    assert repository.envelope(INFO.address) == b"three" and repaired.created_at == first.created_at
    repository.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_events_are_append_only(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    repository = AssetRepository(url)
    repository.start_run("run-1", "demo", "0" * 64)
    lines = [json.dumps({"seq": n, "event": "germinate", "prev": "0" * 64}, sort_keys=True) for n in range(3)]
    for line in lines:
        repository.append_event("run-1", line)
    repository.append_event("run-1", lines[1])  # a retried write is a no-op
    assert [e.line for e in repository.events("run-1")] == lines
    with pytest.raises(RepositoryError, match="seq 1"):
        repository.append_event("run-1", json.dumps({"seq": 1, "event": "cull"}))
    for statement in ("UPDATE events SET kind = 'cull'", "DELETE FROM events"):
        with pytest.raises(Exception, match="append-only"), repository.engine.begin() as db:
            db.execute(text(statement))
    assert len(repository.events("run-1")) == 3
    repository.finish_run("run-1", "completed")
    repository.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_database_refuses_truncate_and_lines_whose_sha256_is_not_theirs(backend: str, tmp_path: Path,
                                                                           request: pytest.FixtureRequest) -> None:
    """Issue 11 item 9: the database itself, not only Esper's code, keeps the events table append-only
    and verbatim: a direct TRUNCATE (PostgreSQL) and an INSERT with a forged digest both fail."""
    url = f"sqlite:///{tmp_path / 'e.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    repository = AssetRepository(url)
    repository.start_run("run-1", "demo", "0" * 64)
    line = json.dumps({"seq": 0, "event": "run_start", "prev": "0" * 64}, sort_keys=True)
    repository.append_event("run-1", line)
    forged = json.dumps({"seq": 1, "event": "fossilize", "prev": "0" * 64}, sort_keys=True)
    insert = text("INSERT INTO events (run_id, seq, kind, line, sha256, created_at) "
                  "VALUES ('run-1', 1, 'fossilize', :line, :sha, 0)")
    with pytest.raises(Exception, match="sha256 does not match the line"), repository.engine.begin() as db:
        db.execute(insert, {"line": forged, "sha": hashlib.sha256(line.encode()).hexdigest()})
    with repository.engine.begin() as db:  # the line's own digest is accepted
        db.execute(insert, {"line": forged, "sha": hashlib.sha256(forged.encode()).hexdigest()})
    statements = ["TRUNCATE events", "TRUNCATE events CASCADE"] if backend == "postgresql" else ["DELETE FROM events"]
    for statement in statements:
        with pytest.raises(Exception, match="append-only"), repository.engine.begin() as db:
            db.execute(text(statement))
    assert [e.seq for e in repository.events("run-1")] == [0, 1]
    repository.close()


def test_close_does_not_wait_for_a_connection_to_a_server_that_never_answers() -> None:
    """A PostgreSQL URL whose server accepts connections and never answers (a hung database): the
    first use blocks in libpq's connect until its timeout (15 s here). close(), at the end of a run,
    used to wait for it on the repository's lock; it now returns at once, and the attempt, when it
    ends, keeps no engine."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nothing ever reads or answers
    repository = AssetRepository(f"postgresql://esper@127.0.0.1:{silent.getsockname()[1]}/esper")
    outcome: list[BaseException] = []

    def first_use() -> None:
        try:
            repository.engine
        except BaseException as exc:  # the outcome under test
            outcome.append(exc)

    attempt = threading.Thread(target=first_use, daemon=True)
    attempt.start()
    time.sleep(0.5)  # the attempt holds the repository's lock, connecting
    assert attempt.is_alive()
    started = time.monotonic()
    repository.close()
    assert time.monotonic() - started < 5.0  # not libpq's 15 s
    silent.close()  # the attempt now fails (or, were it to connect, gives its engine up)
    attempt.join(timeout=30)
    assert not attempt.is_alive() and outcome and repository._engine is None
