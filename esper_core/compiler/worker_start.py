"""The first code a compile worker runs: deliberately free of PyTorch at import.

A worker process imports this module to unpickle its initializer, before anything else of Esper;
:func:`init_worker` then starts the parent watchdog at once, and only afterwards does the worker
import PyTorch and the compiler (seconds on a loaded machine). With the watchdog started after those
imports, a parent killed (kill -9) meanwhile left its worker, and multiprocessing's resource tracker,
running until the imports finished (9 of 67 such kills in ``benchmarks/kill_resume.py``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

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
