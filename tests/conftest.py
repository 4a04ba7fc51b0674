"""Shared fixtures: the real services the storage tests talk to, and one torch thread for training tests.

A test that needs Redis or PostgreSQL (or a tool CI installs: Chromium, promtool) skips on a machine
without them, but fails when ``ESPER_REQUIRE_SERVICES=1`` (set by ``.ci/run``), so CI can never go
green by skipping them.
Addresses: ``ESPER_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and
``ESPER_TEST_POSTGRES_URL`` (default ``postgresql://root@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

if TYPE_CHECKING:
    from esper_core.compiler.artifact import Kernel

REDIS_URL = os.environ.get("ESPER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("ESPER_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


def require_service(name: str, probe: Callable[[], object]) -> None:
    """Skip (or, with ``ESPER_REQUIRE_SERVICES=1``, fail) unless ``probe()`` succeeds."""
    try:
        probe()
    except Exception as exc:  # any failure to reach the service means the same thing here
        first_line = (str(exc).strip().splitlines() or ["no message"])[0]
        message = f"{name} is not available: {type(exc).__name__}: {first_line}"
        if os.environ.get("ESPER_REQUIRE_SERVICES") == "1":
            pytest.fail(message + " (ESPER_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(message)


def require_tool(*names: str, package: str) -> str:
    """The path of the first of ``names`` on PATH; skips (or, with ``ESPER_REQUIRE_SERVICES=1``, fails)
    naming the Debian ``package`` that provides it when none is installed."""
    found = next((path for path in map(shutil.which, names) if path), None)

    def probe() -> None:
        if found is None:
            raise FileNotFoundError(f"{' / '.join(names)} not on PATH (apt-get install {package})")

    require_service(names[0], probe)
    assert found is not None
    return found


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis; tests use a private key namespace on it (see ``redis_namespace``)."""
    import redis

    require_service(f"Redis at {REDIS_URL}", lambda: redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    return REDIS_URL


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A key prefix no other test or user shares; its keys are deleted afterwards."""
    import redis

    namespace = f"esper-test-{uuid.uuid4().hex[:12]}"
    yield namespace
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of the ``test`` database whose tables live in a fresh schema, dropped afterwards."""
    import psycopg

    base = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    conninfo = POSTGRES_URL

    def connect() -> psycopg.Connection:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=3)

    require_service(f"PostgreSQL at {POSTGRES_URL}", lambda: connect().close())
    schema = f"esper_test_{uuid.uuid4().hex[:12]}"
    with connect() as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in base else "?"
    yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    with connect() as connection:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@dataclass
class PrivateRedis:
    """A ``redis-server`` of the test's own on a free loopback port: stopping it harms nobody."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [_redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation, as a crashed or partitioned one does."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError("redis-server is not on PATH")
    return path


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    """A private Redis for tests that stop and restart it (module-scoped: started once per module)."""
    require_service("redis-server", _redis_server_binary)
    server = PrivateRedis(free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def storage_kernels() -> list[Kernel]:
    """Six real kernels (compiled once per session; about 20 KB each, like the builtin blueprints')."""
    from esper_core.blueprints.host import HostSpec
    from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
    from esper_core.compiler.kernels import KernelSpec
    from esper_core.compiler.pipeline import compile_kernel

    blueprint = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint
    return [compile_kernel(KernelSpec(blueprint, HostSpec("linear", width, 16), 4))
            for width in (8, 12, 16, 24, 32, 48)]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Train on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    restoring the caller's setting afterwards.

    Ops this small do not gain from a second thread, and on a shared two-core CI runner OpenMP threads
    spinning against other processes made a 200-step run ten times slower. Runs compared for
    bit-equality all use the same thread count, so the comparison is unaffected."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
