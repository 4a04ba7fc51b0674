"""The first code a compile worker runs: deliberately free of PyTorch at import.

A worker process imports this module to unpickle its initializer, before anything else of Esper;
:func:`init_worker` then starts the parent watchdog at once, and only afterwards does the worker
import PyTorch and the compiler (seconds on a loaded machine). With the watchdog started after those
imports, a parent killed (kill -9) meanwhile left its worker, and multiprocessing's resource tracker,
running until the imports finished (9 of 67 such kills in ``benchmarks/kill_resume.py``).

Workers are started with multiprocessing's spawn, which first re-runs the parent's main script in
the worker; :func:`refuse_during_worker_start` stops a script whose training code is not guarded by
``if __name__ == "__main__":`` from starting a second run there.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import warnings

from esper_core.errors import EsperError

MAIN_GUARD = ("a script that trains with Esper must run its training code under `if __name__ == \"__main__\":` "
              "(Esper's compile workers are spawned processes, and each first re-runs the main script)")
"""The advice given when a worker re-runs an unguarded script (here) or dies before replying (the service)."""

PARENT_POLL_S = 0.2
"""How often a worker checks that its parent is alive (kill -9 of the parent: the worker exits within this)."""


def init_worker(parent: int) -> None:
    """Worker start-up: exit when the parent dies, ignore Ctrl-C (the parent decides), one thread."""
    threading.Thread(target=_exit_with_parent, args=(parent,), name="esper-parent-watchdog", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C is dropped: ignored
    import torch  # after the watchdog: importing it is the slow part of a worker's start

    torch.set_num_threads(1)
    # Validation reloads the just-written .pt2 from bytes; torch warns that the buffer is read-only,
    # which is harmless here and would otherwise land in the middle of the user's training output.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _exit_with_parent(parent: int) -> None:
    """Runs in the worker: once the parent is gone (the worker is re-parented), exit at once. A compile
    in progress is abandoned; nobody is left to receive it."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def refuse_during_worker_start() -> None:
    """Raise when called while a spawned process is still starting (re-running the parent's main
    script), not once it runs its task. Without this, an unguarded script started a second run
    inside each compile worker (its own run directory and ``run_start`` event), that run's compile
    workers were refused by multiprocessing, and the parent got no kernels: the run trained without
    growing. ``_inheriting`` is the flag multiprocessing's own check of the same mistake reads; a
    process of a user's own pool that trains with Esper as its task is not affected."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise EsperError(f"not starting a run inside a worker process that is still starting: {MAIN_GUARD}")
