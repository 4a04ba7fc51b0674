"""Kernel supply: every kernel a run asks for, from the store at once or compiled in the background.

Nothing here ever blocks a training step: :meth:`KernelSupply.request` returns a future, done at once
on a store hit (memory -> Redis -> SQL -> disk) and otherwise completed by a background compile
worker started on the first miss. The controller polls futures between steps. Only two callers may
wait, both before training proper: a deterministic start (:meth:`wait`, so the step at which a seed
starts never depends on compile speed) and a resume that must rebuild the seeds a checkpoint holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from torch import nn
import torch

from esper_core.compiler.artifact import Kernel
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.service import CompileService
from esper_core.compiler.store import KernelStore

Compiled = Callable[[float, bool], None]
"""Told how long each background compile took and whether it succeeded (from the training thread)."""


class KernelSupply:
    def __init__(self, store: KernelStore, on_compiled: Compiled | None = None) -> None:
        self.store = store
        self.on_compiled = on_compiled
        self._compiler: CompileService | None = None  # started on the first store miss
        self._futures: dict[str, Future[Kernel]] = {}
        self._started: dict[str, float] = {}  # address -> when its compile was requested
        self._finished: dict[str, float] = {}  # address -> when the worker delivered it
        self.blocked = 0  # times a caller had to wait on a compile after training started
        # kernels sent to this process's own compile worker (store misses): under torchrun only rank 0
        # should have any, the others finding its kernels in the shared store
        self.compiled_here = 0

    def request(self, spec: KernelSpec) -> Future[Kernel]:
        """The kernel for ``spec``: from the store at once, else compiled by the background worker."""
        address = spec.address()
        future = self._futures.get(address)
        if future is None:
            stored = self.store.get(address)
            if stored is not None:
                future = Future()
                future.set_result(stored)
            else:
                if self._compiler is None:
                    self._compiler = CompileService(self.store, warm=False)
                self._started[address] = time.perf_counter()
                self.compiled_here += 1
                future = self._compiler.request(spec, missed=True)
                future.add_done_callback(lambda _: self._finished.setdefault(address, time.perf_counter()))
            self._futures[address] = future
        return future

    def poll(self, spec: KernelSpec) -> Future[Kernel] | None:
        """The kernel's future if it is done (requesting it if needed), else ``None``; never waits."""
        future = self.request(spec)
        if not future.done():
            return None
        self._settle(spec.address(), future.exception() is None)
        return future

    def wait(self, specs: Iterable[KernelSpec]) -> dict[str, BaseException | None]:
        """Request every spec and wait for all of them; returns each address's error (``None`` if usable)."""
        futures = {spec.address(): self.request(spec) for spec in specs}
        outcome = {}
        for address, future in futures.items():
            error = future.exception()
            self._settle(address, error is None)
            outcome[address] = error
        return outcome

    def build(self, spec: KernelSpec, device: torch.device, dtype: torch.dtype, waited: bool = False) -> nn.Module:
        """The kernel's module with its stored initial weights. Waits for a compile if needed: only a
        resume, rebuilding the seeds a checkpoint holds, may call this; ``waited`` counts it."""
        future = self.request(spec)
        if not future.done() and waited:
            self.blocked += 1
        return future.result().instantiate(device, dtype)

    def latency_ms(self, spec: KernelSpec) -> float | None:
        """The kernel's characterised forward+backward latency, or ``None`` while it compiles."""
        future = self.poll(spec)
        if future is None or future.exception() is not None:
            return None
        return float(future.result().manifest["characterisation"]["latency_ms"])

    @property
    def worker_started(self) -> bool:
        """Whether any kernel had to be compiled (a store miss started the background worker)."""
        return self._compiler is not None

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close(wait=False)
            self._compiler = None

    def _settle(self, address: str, ok: bool) -> None:
        """Report a background compile once, from the caller's (training) thread."""
        if address in self._started and address in self._finished:
            seconds = self._finished.pop(address) - self._started.pop(address)
            if self.on_compiled is not None:
                self.on_compiled(seconds, ok)
