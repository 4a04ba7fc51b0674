"""Stopping a run on SIGINT/SIGTERM: finish the current step, write a checkpoint, then exit.

A signal handler may run between any two bytecodes, so it only records the signal; the loop looks
at it between steps, where the run's state is whole and a checkpoint of it can be resumed bit-exact.
Under torchrun the ranks must stop at the same step (a rank that stopped alone would hang the
others in their next collective), so they agree on it before acting.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from esper_core.errors import EsperError

if TYPE_CHECKING:
    from esper_core.distributed.world import World
    from esper_core.training.trainer import Trainer


class Interrupted(EsperError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; exits 128 + the signal number."""


class StopSignals:
    """The SIGINT/SIGTERM handlers of one :meth:`~esper_core.training.trainer.Trainer.fit`, and the
    signal they caught (``None`` until one arrives)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGINT/SIGTERM as a request to stop; Python lets only the main thread set handlers,
        so a trainer run from another thread keeps the process's own."""
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum: int, frame: object) -> None:
            self.received = signum
        self._previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced, so the caller's Ctrl-C works again after fit."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self, world: World | None, step: int, log_every: int) -> bool:
        """Whether to stop now. Under torchrun a signal may reach one rank only, or the ranks at
        different steps: they agree at each log step (one tiny all-reduce) and stop together."""
        if world is None:
            return self.received is not None
        if step % log_every:
            return False
        signum = world.largest(int(self.received or 0))
        if signum and self.received is None:
            self.received = signum  # another rank's: say (and exit with) the signal that was sent
        return bool(signum)


def stop(trainer: Trainer) -> NoReturn:
    """Write the checkpoint (rank 0), record the ``interrupted`` event and raise :class:`Interrupted`,
    whose message tells the user how to continue."""
    signals = trainer.signals
    signals.received = signals.received or signal.SIGTERM  # another rank's, when it was not passed on
    if not trainer.leader:
        interrupted = Interrupted(f"stopped at step {trainer.step} with rank 0, which wrote the checkpoint")
        interrupted.exit_code = 128 + int(signals.received)
        raise interrupted
    path = trainer.save_checkpoint()
    name = signal.Signals(signals.received).name if signals.received else "signal"
    trainer.recorder.record({"event": "interrupted", "step": trainer.step, "signal": name, "checkpoint": path.name})
    trainer.recorder.mirror(lambda repo: repo.finish_run(trainer.recorder.run_id, "interrupted"))
    interrupted = Interrupted(f"{name} received: stopped at step {trainer.step}; checkpoint {path} written. "
                              f"Continue with: esper resume --checkpoint {trainer.run_dir}")
    interrupted.exit_code = 128 + int(signals.received or signal.SIGINT)
    raise interrupted
