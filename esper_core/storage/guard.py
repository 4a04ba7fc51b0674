"""Deadlines and circuit breakers: a slow or dead tier costs a bounded wait, then nothing.

DESIGN: a tier that is down or slow is skipped; it never fails a run. Socket timeouts alone do not
give that: libpq rounds connect timeouts up to 2 s, a client library may retry, and a blackholed
peer holds a socket for minutes. So a remote tier's calls run on its own small thread pool and the
caller waits at most the tier's deadline; a call still running then is abandoned (its result, for
content-addressed writes, is harmless whenever it lands). After ``failures`` consecutive errors or
missed deadlines the breaker opens and calls are refused at once for ``reset_s``; then one trial
call is let through, and its outcome closes or reopens the breaker. An outage is logged once, when
the breaker opens, and once more when the tier is back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from esper_core.compiler.artifact import CorruptKernel

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def describe(exc: BaseException) -> str:
    """One line about a failure: the driver's own error when wrapped (SQLAlchemy), first line only."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else 'no message'}"


class TierUnavailable(Exception):
    """The tier did not answer (error, missed deadline, or breaker open): treat as a miss there."""


@dataclass
class TierCounters:
    """Per-tier figures for :meth:`PersistentKernelCache.stats` (and Prometheus, later)."""

    hits: int = 0
    misses: int = 0
    integrity_failures: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    slowest_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Breaker:
    """Consecutive-failure circuit breaker; thread-safe."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.reset_s, self._clock = failures, reset_s, clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return CLOSED
            return HALF_OPEN if self._trial or self._clock() - self._opened_at >= self.reset_s else OPEN

    def allow(self) -> bool:
        """Whether a call may go through now (while open, exactly one trial after ``reset_s``)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial or self._clock() - self._opened_at < self.reset_s:
                return False
            self._trial = True
            return True

    def success(self) -> bool:
        """Record a success; returns True when this closed an open breaker."""
        with self._lock:
            reopened = self._opened_at is not None
            self._consecutive, self._opened_at, self._trial = 0, None, False
            return reopened

    def failure(self) -> bool:
        """Record a failure; returns True when this opened a closed breaker."""
        with self._lock:
            self._consecutive += 1
            if self._opened_at is not None:  # a failed trial: stay open for another period
                self._opened_at, self._trial = self._clock(), False
                return False
            if self._consecutive >= self.failures:
                self._opened_at = self._clock()
                return True
            return False


OPEN_DEADLINE_S = 10.0
"""How long calls wait, once, for a tier's first connection (and migration) to finish. It is paid once
per process, and a local SQLite needs about 0.2 s (more on a loaded machine) to import Alembic and
create its schema: counting it against a one-second call deadline made every fresh workspace report
"sql: deadline missed". A server that refuses or cannot be reached fails the open at its own connect
timeout, not this one."""


class DaemonPool:
    """The threads a remote tier's calls run on, which never hold up the end of the process.

    A ``ThreadPoolExecutor`` joins its threads when the interpreter exits, so a call the guard had
    abandoned, stuck in the connect of a server that accepts and never answers (libpq waits out its
    connect timeout), kept a finished ``esper train`` from returning to the shell for about 15 s more.
    An abandoned call's result is harmless whenever it lands (module docstring), so its thread may
    simply end with the process: these are daemon threads."""

    def __init__(self, threads: int, name: str) -> None:
        self._size, self._name = threads, name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)``; raises ``RuntimeError`` after :meth:`shutdown`, as an executor does."""
        future: Future[T] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if len(self._threads) < self._size:  # started as calls come, like an executor's
                thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
            self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the call's outcome, whatever it is, belongs to its future
                future.set_exception(exc)

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """Stop taking calls; queued ones are cancelled (``cancel_futures``) or still run; ``wait``
        joins the threads (a stuck call then holds this up, as it would an executor's)."""
        with self._lock:
            self._shut = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


class Guard:
    """Runs one tier's calls under its deadline and breaker, keeping its counters.

    ``deadline_s=None`` runs calls in the caller's thread (the local disk: no network to wait on),
    still behind the breaker. :class:`CorruptKernel` is an answer, not a failure of the tier.
    :meth:`open` starts the tier's connection in the background; calls wait for it (up to
    :data:`OPEN_DEADLINE_S`, once) before their own deadline starts.
    """

    def __init__(self, name: str, deadline_s: float | None, breaker: Breaker, threads: int = 2) -> None:
        self.name, self.deadline_s, self.breaker = name, deadline_s, breaker
        self.counters = TierCounters()
        self.notices: list[str] = []
        self._lock = threading.Lock()
        self._pool = None if deadline_s is None else DaemonPool(threads, f"esper-{name}")
        self._opening: Future[Any] | None = None

    def open(self, fn: Callable[[], Any]) -> None:
        """Run the tier's connect-and-migrate ``fn`` in the background now."""
        if self._pool is not None:
            self._opening = self._pool.submit(fn)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` within the deadline, or :class:`TierUnavailable`."""
        if not self.breaker.allow():
            self._count("skipped")
            raise TierUnavailable(f"{self.name}: circuit open")
        self._wait_until_open()
        started = time.perf_counter()
        try:
            result = fn(*args) if self._pool is None else self._wait(self._pool.submit(fn, *args))
        except CorruptKernel:
            self._succeeded()
            raise
        except FutureTimeout:
            self._failed("timeouts", f"no answer within {self.deadline_s * 1000:.0f} ms")  # type: ignore[operator]
            raise TierUnavailable(f"{self.name}: deadline missed") from None
        except Exception as exc:
            self._failed("errors", describe(exc))
            raise TierUnavailable(f"{self.name}: {describe(exc)}") from exc
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            with self._lock:
                self.counters.slowest_ms = max(self.counters.slowest_ms, elapsed)
        self._succeeded()
        return result

    def _wait_until_open(self) -> None:
        """Wait for the background open (every caller until it ends, at most once for the deadline):
        its failure is the tier's failure, like a call's."""
        opening = self._opening
        if opening is None:
            return
        try:
            opening.result(timeout=OPEN_DEADLINE_S)
        except FutureTimeout:
            self._opening = None  # waited once: later calls have only their own deadline
            self._failed("timeouts", f"not connected within {OPEN_DEADLINE_S:g} s")
            raise TierUnavailable(f"{self.name}: not connected within {OPEN_DEADLINE_S:g} s") from None
        except Exception as exc:
            self._opening = None
            self._failed("errors", describe(exc))
            raise TierUnavailable(f"{self.name}: {describe(exc)}") from exc
        self._opening = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background (promotions, usage flushes); failures feed the breaker."""
        if self._pool is None or not self.breaker.allow():
            return

        def done(future: Future[Any]) -> None:
            if future.cancelled():  # the cache is closing: says nothing about the tier
                return
            error = future.exception()
            if error is None:
                self._succeeded()
            else:
                self._failed("errors", describe(error))

        try:
            self._pool.submit(fn, *args).add_done_callback(done)
        except RuntimeError:  # the pool is shut down: the cache is closing, nothing to promote into
            return

    def close(self, wait: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.counters, field, getattr(self.counters, field) + 1)

    def _wait(self, future: Future[T]) -> T:
        try:
            return future.result(timeout=self.deadline_s)
        except FutureTimeout:
            future.cancel()  # if still queued behind a stuck call, do not run it late
            raise

    def _succeeded(self) -> None:
        if self.breaker.success():
            message = f"kernel cache: the {self.name} tier is back"
            self.notices.append(message)
            log.info(message)

    def _failed(self, field: str, reason: str) -> None:
        self._count(field)
        if self.breaker.failure():
            message = (f"kernel cache: the {self.name} tier is unavailable ({reason}); skipping it for "
                       f"{self.breaker.reset_s:g} s and continuing on the other tiers")
            self.notices.append(message)
            log.warning(message)
