"""``trainer.compile``: how a model with Kasmina layers is handed to ``torch.compile``.

On one device ``esper train`` compiles only passes in which every layer is its host alone, as one
graph. In the seed-path variant (what DDP wraps) each wrapped layer ends its compiled region at the
eager seed path (see ``esper_core.seeds.kasmina._seed_path_boundary``), so the code of
``KasminaLayer.forward`` and of every frame above it is compiled once per distinct layer shape.
With PyTorch's defaults that goes wrong twice: after the second shape, automatic dynamic shapes
recompile those frames with symbolic sizes (slower kernels for every later step), and past
``recompile_limit`` specialisations (8) a frame silently falls back to eager. On an H200 the CNN of
``benchmarks/throughput.py`` ran at 0.61 of the plain compiled loop that way before a single seed
existed. So the model is compiled with static shapes, and the limit is raised to hold one
specialisation per wrapped layer (the batch size of a training step never changes, so static shapes
cost no recompile during training).
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esper_core.errors import one_line


def compile_model(model: nn.Module, mode: str, wrapped_layers: int, backend: Any = "inductor") -> nn.Module:
    """``torch.compile(model, mode=mode)`` with static shapes and room for ``wrapped_layers`` variants
    (``recompile_limit`` is process-wide in PyTorch: it is only ever raised). ``mode`` applies to the
    inductor backend; another ``backend`` (a dynamo backend callable) is used as given."""
    import torch._dynamo.config as dynamo_config

    room = 3 * wrapped_layers + 8  # every layer shape, the frames resumed above each break, the whole graph
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, room)
    if backend == "inductor":
        return torch.compile(model, mode=mode, dynamic=False)
    return torch.compile(model, backend=backend, dynamic=False)


MAX_TOPOLOGIES = 16
"""Distinct topologies a run compiles at most; later ones run eagerly. Each is one more entry that
dynamo checks on every compiled step, and a run that keeps changing its seeds past this many has
little settled time to gain back."""


class WholeGraph:
    """The compiled model of a single-device ``esper train`` run, and which steps may run it.

    A step runs the compiled whole graph when every Kasmina layer is settled (see
    :meth:`~esper_core.seeds.kasmina.KasminaLayer.settled`) and that topology has been compiled;
    otherwise it runs eagerly. A topology is compiled in one of two ways:

    * ``background=True`` (a CUDA run that need not be deterministic): every settled topology after
      the run's first (which compiles at start-up, like any compiled loop's), on a thread of its own,
      by one training pass (forward and backward) of a copy of the model through a wrapper of the
      copy. Dynamo keeps its compiled entries on the model classes' code, guarded on structure, not on
      module identity, so the entry serves the training model, which keeps training eagerly
      meanwhile: a germination, fossilization or cull costs no stall (on an H200 a CNN's compile
      takes 10-14 s). While a compile is in flight no step runs a compiled pass, so dynamo never runs
      on two threads at once. Not on the CPU: there the compile takes the cores training runs on (a
      CNN on 2 cores trained at 0.34 of the plain loop's speed while its topologies compiled in the
      background).
    * ``background=False``: on the training thread, by the first step that runs the topology, and
      only for topologies that last: the dormant one (every layer idle) and one that ``lasting()``
      says no decision can change (no live seed, growth over). What ``run.deterministic: true``
      needs: which steps run compiled is a function of the run's state, not of how long a compile
      took, or a resumed run would differ from the uninterrupted one. A compile on the training
      thread stalls training for its length, so the passes in between run eagerly.

    Two more reasons the background is only for runs that are not deterministic: its pass consumes
    random numbers (dropout) from PyTorch's global generators, and while dynamo compiles,
    ``torch.compiler.is_compiling()`` is true on every thread (a process-wide flag), so library code
    that branches on it takes its compile path on the training thread too. For the optimizers that is
    the same arithmetic rounded differently (a tiny MLP's weights after 200 steps: within 1e-4).
    """

    def __init__(self, model: nn.Module, mode: str, layers: list[Any], training_pass: Callable[[nn.Module, Any], torch.Tensor],
                 background: bool, lasting: Callable[[], bool], on_compiled: Callable[[dict[str, Any]], None],
                 backend: Any = "inductor") -> None:
        self.model, self.layers = model, layers
        self._compile = functools.partial(compile_model, mode=mode, wrapped_layers=len(layers) + MAX_TOPOLOGIES,
                                          backend=backend)
        self.compiled = self._compile(model)
        self.training_pass, self.background, self.lasting = training_pass, background, lasting
        self.on_compiled = on_compiled
        self.ready: set[tuple[Any, ...]] = set()
        self.failed: set[tuple[Any, ...]] = set()
        self._job: _Compile | None = None

    def model_for(self, batch: Any, step: int) -> nn.Module | None:
        """The compiled model if this step can run it, else ``None`` (run the model eagerly). ``batch``
        is what a compile in the background trains its copy on."""
        self._collect(step)
        if not all(layer.settled() for layer in self.layers):
            return None
        if not self.background and not (all(layer.idle() for layer in self.layers) or self.lasting()):
            return None
        key = tuple(layer.topology() for layer in self.layers)
        if key in self.ready:
            return self.compiled if self._job is None else None
        if key in self.failed or len(self.ready) + len(self.failed) >= MAX_TOPOLOGIES:
            return None
        if not self.background or not (self.ready or self.failed):  # the run's first compile: at start-up
            self.ready.add(key)  # this step's pass compiles it
            return self.compiled
        if self._job is None:
            self._job = _Compile(key, self._copy(), batch, self._compile, self.training_pass, step)
        return None

    def close(self) -> None:
        """Wait for a compile in flight (a thread inside dynamo must not outlive the run)."""
        if self._job is not None:
            self._job.thread.join()
            self._job = None

    def _collect(self, step: int) -> None:
        job = self._job
        if job is None or job.thread.is_alive():
            return
        self._job = None
        (self.ready if job.error is None else self.failed).add(job.key)
        self.on_compiled({"event": "graph_compiled", "step": step, "started": job.step, "seconds": job.seconds,
                          "seeds": sum(len(seeds) for _, seeds in job.key), "ok": job.error is None,
                          "error": job.error})

    def _copy(self) -> nn.Module:
        """A copy of the model to compile with; the input a layer kept for a span seed is left out (it
        belongs to the last step's autograd graph, which cannot be copied)."""
        memo = {id(layer.captured): None for layer in self.layers if layer.captured is not None}
        return copy.deepcopy(self.model, memo)


class _Compile:
    """One topology compiled on a thread of its own (see :class:`WholeGraph`)."""

    def __init__(self, key: tuple[Any, ...], model: nn.Module, batch: Any, compile_copy: Callable[[nn.Module], nn.Module],
                 training_pass: Callable[[nn.Module, Any], torch.Tensor], step: int) -> None:
        self.key, self.step = key, step
        self.seconds = 0.0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(model, batch, compile_copy, training_pass),
                                       name="esper-compile", daemon=True)
        self.thread.start()

    def _run(self, model: nn.Module, batch: Any, compile_copy: Callable[[nn.Module], nn.Module],
             training_pass: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        started = time.perf_counter()
        try:
            training_pass(compile_copy(model), batch).backward()
        except Exception as error:  # reported by the training thread; this topology then runs eagerly
            self.error = _describe(error)
        self.seconds = time.perf_counter() - started


def _describe(error: BaseException) -> str:
    """One line for a failed compile: the error and, when dynamo wraps it, the cause it wraps."""
    cause = error
    while (inner := cause.__cause__ or getattr(cause, "inner_exception", None)) is not None:
        cause = inner
    return one_line(error) if cause is error else f"{one_line(error)} ({one_line(cause)})"
