"""Anomaly detection over a run's metric streams: loss spikes, stalled loss, failing compiles, memory growth.

The detector only observes and reports; it never acts. Each finding is an event dict
``{"event": "anomaly", "kind": ..., "step": ..., ...evidence}`` that the trainer appends to the
hash-chained event log and then hands to its listeners (the governor, which decides on rollbacks,
subscribes through :meth:`esper_core.telemetry.run.RunTelemetry.subscribe`), so a response is
always recorded after the finding that caused it. Keeping detection apart from the response lets a
governor be tested against scripted anomalies, and the detector be tested without a model.

It is fed only values the trainer already holds on the host (the loss it reads every ``log_every``
steps, compile outcomes, the RSS read at the same cadence), so it adds no host-device sync.
Each kind fires once per episode, then re-arms when the condition has cleared, so a persistent
problem produces one record rather than one per step.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]


@dataclass(frozen=True)
class AnomalyThresholds:
    """When a metric stream counts as anomalous; the recipe's ``telemetry.anomaly_*`` keys."""

    window: int = 20
    """Logged losses that form the reference window for spikes and stalls."""
    spike_z: float = 4.0
    """A loss more than this many standard deviations above the window's mean is a spike."""
    stall_improvement: float = 0.01
    """A stall: for ``window`` logged losses, the loss level (the mean of the last half window) has not
    gone below its best so far by this share. Not "the second half of one window against its first":
    minibatch noise made that flap around any threshold, firing 10-30 times on every healthy
    3000-step run of the growth benchmark."""
    compile_failure_rate: float = 0.5
    """Share of failed kernel builds, over the last ``window`` builds (at least 4), that is anomalous."""
    memory_growth: float = 0.5
    """Growth of resident memory over its baseline (0.5 = +50%) that is anomalous; the baseline is reset
    to the new level after each finding, so only further growth fires again."""


_MIN_COMPILES = 4


class AnomalyDetector:
    """Stateful detector over the streams of one run. Every ``observe_*`` returns the new findings."""

    def __init__(self, thresholds: AnomalyThresholds = AnomalyThresholds()) -> None:
        self.thresholds = thresholds
        self._losses: deque[float] = deque(maxlen=thresholds.window)
        self._compiles: deque[bool] = deque(maxlen=max(thresholds.window, _MIN_COMPILES))
        self._rss_baseline: int | None = None
        self._outliers = 0
        self._armed = {"loss_spike": True, "loss_stall": True, "compile_failures": True}
        self._best: float | None = None  # the lowest loss level so far (by at least stall_improvement)
        self._since_best = 0  # logged losses since then

    def observe_loss(self, step: int, loss: float) -> list[Event]:
        """A training loss the trainer has already read on the host."""
        found: list[Event] = []
        history = self._losses
        if not math.isfinite(loss):
            found += self._fire("loss_spike", step, loss=loss, reason="the loss is not finite")
            return found
        if len(history) >= max(5, self.thresholds.window // 2):
            mean = statistics.fmean(history)
            # in floats: statistics.pstdev is exact (fractions), 0.2 ms a logged step for nothing a z-score needs
            std = math.sqrt(statistics.fmean([(x - mean) ** 2 for x in history]))
            z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
            if z > self.thresholds.spike_z:
                found += self._fire("loss_spike", step, loss=loss, window_mean=mean, window_std=std,
                                    zscore=z if math.isfinite(z) else None,
                                    reason=f"loss {loss:.4g} is {z:.1f} standard deviations above the "
                                           f"mean {mean:.4g} of the last {len(history)} logged losses")
                # A spike stays out of the window so that it cannot mask the next one; a loss that
                # stays up for half a window is a new level, which the window then learns afresh.
                self._outliers += 1
                if self._outliers < max(2, self.thresholds.window // 2):
                    return found
                history.clear()
            else:
                self._armed["loss_spike"] = True
        self._outliers = 0
        history.append(loss)
        return found + self._stall(step, loss)

    def _stall(self, step: int, loss: float) -> list[Event]:
        """A new best level (by ``stall_improvement``) re-arms; ``window`` logged losses without one fire."""
        window = self.thresholds.window
        half = max(1, window // 2)
        if len(self._losses) < half:
            return []
        level = statistics.fmean(list(self._losses)[-half:])
        best = self._best
        if best is None or level < best - self.thresholds.stall_improvement * abs(best):
            self._best, self._since_best = level, 0
            self._armed["loss_stall"] = True
            return []
        self._since_best += 1
        if self._since_best < window:
            return []
        return self._fire("loss_stall", step, loss=loss, level=level, best_level=best,
                          logged_since_best=self._since_best,
                          reason=f"the loss level (mean of the last {half} logged losses, {level:.4g}) has not "
                                 f"gone {self.thresholds.stall_improvement:.2%} below its best ({best:.4g}) "
                                 f"for {self._since_best} logged steps")

    def observe_compile(self, step: int, ok: bool) -> list[Event]:
        """The outcome of one kernel build (or cache-miss compile)."""
        self._compiles.append(ok)
        failures = self._compiles.count(False)
        rate = failures / len(self._compiles)
        if len(self._compiles) < _MIN_COMPILES or rate < self.thresholds.compile_failure_rate:
            self._armed["compile_failures"] = True
            return []
        return self._fire("compile_failures", step, failures=failures, attempts=len(self._compiles), rate=rate,
                          reason=f"{failures} of the last {len(self._compiles)} kernel builds failed")

    def observe_memory(self, step: int, rss_bytes: int) -> list[Event]:
        """The process's resident set size; the first observation is the baseline."""
        baseline = self._rss_baseline
        if baseline is None or baseline <= 0:
            self._rss_baseline = rss_bytes
            return []
        growth = rss_bytes / baseline - 1.0
        if growth <= self.thresholds.memory_growth:
            return []
        self._rss_baseline = rss_bytes
        return [{"event": "anomaly", "kind": "memory_growth", "step": step, "rss_bytes": rss_bytes,
                 "baseline_bytes": baseline, "growth": growth,
                 "reason": f"resident memory grew {growth:.0%} from {baseline / 2**20:.1f} MiB "
                           f"to {rss_bytes / 2**20:.1f} MiB"}]

    def _fire(self, kind: str, step: int, **evidence: Any) -> list[Event]:
        if not self._armed[kind]:
            return []
        self._armed[kind] = False
        return [{"event": "anomaly", "kind": kind, "step": step, **evidence}]


_statm: tuple[int, int, int] | None = None
"""(process id, descriptor of its ``/proc/self/statm``, page size), kept open by :func:`resident_memory_bytes`."""


def resident_memory_bytes() -> int | None:
    """RSS of this process from ``/proc/self/statm`` (Linux); ``None`` where there is no procfs.

    Read at the logging cadence through one descriptor kept open per process: ``pread`` at offset 0
    makes procfs produce the figures afresh, so a read is one system call, where opening, reading and
    closing the file (and asking the page size) each time took 16 us against 2 us. A child process
    (forked after the first read) inherits the descriptor, which still names its parent's figures,
    and opens its own.
    """
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            if _statm is not None:
                os.close(_statm[1])  # this process's copy of its parent's descriptor
                _statm = None
            page = os.sysconf("SC_PAGE_SIZE")
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC), page)
        pages = int(os.pread(_statm[1], 256, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * _statm[2]
