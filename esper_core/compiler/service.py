"""CompileService: kernels on request, compiled off the training thread.

The trainer asks for a kernel and gets a ``concurrent.futures.Future`` at once; it germinates the
seed when the future is done and keeps training meanwhile (DESIGN: compilation never blocks training).

- A store hit returns an already-completed future; no worker is involved.
- A miss is compiled in a background worker *process* (spawn context: no forked CUDA or thread
  state; one torch thread per worker, so it competes little with training). Only plain data
  crosses the process boundary: the spec as JSON-able dicts going in, the artifact's file bytes
  coming out. The parent verifies those bytes like any stored entry (:meth:`Kernel.from_files`)
  and puts them in the store, so any :class:`KernelStore` works, not only a local one.
- Requests for a kernel already being compiled share its future.
- A failed compile marks that kernel (blueprint x target) unusable: its future, and every later
  request for it, carries a :class:`KernelUnavailable` with the located problems. Nothing raises in
  the caller's thread and nothing is retried in a loop; a new service starts with a clean slate.
- A worker never outlives the process that started it: a watchdog thread in the worker exits it as
  soon as its parent is gone (kill -9 included), and with it goes multiprocessing's resource tracker,
  which exits when the last process holding its pipe does. Ctrl-C reaches the whole foreground
  process group, but only the parent decides what it means: a worker starts with SIGINT blocked and
  then ignores it, so no ``KeyboardInterrupt`` traceback from a worker lands in the user's terminal.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, load_blueprint
from esper_core.compiler.artifact import Kernel
from esper_core.compiler.budget import Budget
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.pipeline import CompileFailed, compile_kernel
from esper_core.compiler.store import KernelStore
from esper_core.compiler.worker_start import MAIN_GUARD, init_worker
from esper_core.errors import EsperError, Problem

log = logging.getLogger(__name__)


class KernelUnavailable(EsperError):
    """The kernel could not be compiled; ``problems`` say why (file-less: the service has only the IR)."""

    exit_code = 1


@dataclass
class ServiceStats:
    hits: int = 0
    compiled: int = 0
    merged: int = 0
    failed: int = 0


class CompileService:
    """See the module docstring. Use as a context manager, or call :meth:`close`."""

    def __init__(self, store: KernelStore, workers: int = 1, budget: Budget = Budget(), warm: bool = True) -> None:
        self.store = store
        self.budget = budget
        self.stats = ServiceStats()
        self._workers = workers
        self._lock = threading.Lock()
        self._pending: dict[str, Future[Kernel]] = {}
        self._unusable: dict[str, KernelUnavailable] = {}
        self._pool = self._new_pool()
        if warm:  # pay process start-up, imports and torch.export's first-call cost before the first miss
            with _sigint_blocked():
                for _ in range(workers):
                    self._pool.submit(_warm_worker)

    def request(self, spec: KernelSpec, missed: bool = False) -> Future[Kernel]:
        """A future of the kernel for ``spec``: done at once on a store hit or a known failure.
        ``missed``: the caller has just looked ``spec`` up in this service's store and missed (a run's
        kernel supply does, so as to start no compile worker on a hit); looking again would count a
        second miss in every tier of the cache's metrics."""
        address = spec.address()
        with self._lock:
            if address in self._unusable:
                return _done(exception=self._unusable[address])
            if address in self._pending:
                self.stats.merged += 1
                return self._pending[address]
            kernel = None if missed else self.store.get(address)
            if kernel is not None:
                self.stats.hits += 1
                return _done(result=kernel)
            outer: Future[Kernel] = Future()
            self._pending[address] = outer
            job = self._submit(spec)
        job.add_done_callback(lambda inner: self._finish(spec, address, inner))
        return outer

    def prefetch(self, specs: Iterable[KernelSpec]) -> list[Future[Kernel]]:
        """Request every spec now (e.g. all kernels a recipe can ask for, at the start of a run)."""
        return [self.request(spec) for spec in specs]

    @property
    def unusable(self) -> dict[str, list[Problem]]:
        """Address -> problems of every kernel that failed to compile in this service."""
        with self._lock:
            return {address: error.problems for address, error in self._unusable.items()}

    def close(self, wait: bool = True) -> None:
        """Stop the workers; with ``wait=False`` queued compiles are cancelled and running ones
        abandoned (their workers terminated): otherwise the interpreter's exit would still wait for
        them, and a Ctrl-C during the first run's kernel wait would take as long as the compiles."""
        running = [] if wait else list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        for process in running:
            if process.is_alive():
                process.terminate()

    def __enter__(self) -> CompileService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init_worker, initargs=(os.getpid(),))

    def _submit(self, spec: KernelSpec) -> Future[dict[str, Any]]:
        """Submit a compile; workers are spawned here, with SIGINT blocked so they inherit it blocked."""
        arguments = (spec.to_json(), asdict(self.budget))
        with _sigint_blocked():
            try:
                return self._pool.submit(_compile_in_worker, *arguments)
            except BrokenProcessPool:  # a worker died (killed, out of memory): start a fresh pool once
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(_compile_in_worker, *arguments)

    def _finish(self, spec: KernelSpec, address: str, job: Future[dict[str, Any]]) -> None:
        """Runs in the pool's result thread: never let an exception escape (it would be swallowed
        and the trainer's future would never complete)."""
        try:
            reply = job.result()
            if not reply["ok"]:
                raise KernelUnavailable([Problem(**p) for p in reply["problems"]])
            kernel = Kernel.from_files(address, reply["files"])
        except Exception as exc:  # worker crash, cancelled job, corrupt reply: all make the kernel unusable
            why = "" if not isinstance(exc, BrokenProcessPool) else (
                f" (its process exited before replying: it was killed, ran out of memory, or re-ran an unguarded "
                f"script; {MAIN_GUARD})")
            error = exc if isinstance(exc, KernelUnavailable) else KernelUnavailable(
                Problem(f"blueprint {spec.blueprint.name!r}", f"[{spec.label()}] compile worker failed: "
                        f"{type(exc).__name__}: {exc}{why}"))
            self._resolve(address, error=error)
            return
        try:
            self.store.put(kernel)
        except OSError as exc:  # the kernel is verified and usable; only the cache write failed
            log.warning("could not store kernel %s: %s", address, exc)
        self._resolve(address, kernel=kernel)

    def _resolve(self, address: str, kernel: Kernel | None = None, error: KernelUnavailable | None = None) -> None:
        with self._lock:
            outer = self._pending.pop(address)
            if error is not None:
                self._unusable[address] = error
                self.stats.failed += 1
            else:
                self.stats.compiled += 1
        if error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(kernel)


def _done(result: Kernel | None = None, exception: BaseException | None = None) -> Future[Kernel]:
    future: Future[Kernel] = Future()
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)  # type: ignore[arg-type]
    return future


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while it spawns workers: a spawned process inherits the signal mask,
    so a worker cannot be interrupted while it imports, before :func:`~esper_core.compiler.worker_start.init_worker` ignores SIGINT. A
    Ctrl-C that arrives meanwhile stays pending and is delivered here when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _warm_worker() -> None:
    """Run one tiny compile: torch.export's first call in a process costs seconds."""
    blueprint = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint
    compile_kernel(KernelSpec(blueprint, HostSpec("linear", 4, 4), 2))


def _compile_in_worker(spec_json: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: plain data in, plain data out (the artifact's bytes, or the problems)."""
    spec = KernelSpec.from_json(spec_json)
    try:
        kernel = compile_kernel(spec, Budget(**budget))
    except CompileFailed as exc:
        return {"ok": False, "problems": [asdict(p) for p in exc.problems]}
    except Exception as exc:  # an internal error must not look like a crashed worker: report it as data
        return {"ok": False, "problems": [asdict(Problem(f"blueprint {spec.blueprint.name!r}",
                                                         f"[{spec.label()}] internal compiler error: "
                                                         f"{type(exc).__name__}: {exc}"))]}
    return {"ok": True, "files": dict(kernel.files)}
