"""RunTelemetry: the one object the trainer reports to during a run.

It owns the run's Prometheus metrics (when ``telemetry.metrics_port`` or
``telemetry.pushgateway_url`` is set), their HTTP endpoint (only with ``metrics_port``), the
periodic push to a Pushgateway (only with ``pushgateway_url``), the anomaly detector, and the
listeners that want anomalies (the governor). Gathering them
here keeps every hook in the training loop a single call, and keeps the loop's cost when metrics
are off to a few attribute checks.

Timing uses ``time.perf_counter`` on the host only. On a GPU the step time so measured is the time
to enqueue the step's work, not to run it, except at the steps that already synchronise (loss reads
every ``log_every`` steps): telemetry never adds a synchronisation to measure more precisely.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import TelemetryConfig
from esper_core.seeds.lifecycle import SeedState
from esper_core.telemetry.anomaly import AnomalyDetector, AnomalyThresholds, resident_memory_bytes
from esper_core.telemetry.metrics import MetricsServer, RunMetrics
from esper_core.telemetry.push import Pusher

log = logging.getLogger(__name__)

Event = dict[str, Any]
Listener = Callable[[Event], None]
_STATE_KEYS = tuple(s.name.lower() for s in SeedState)


def esper_version() -> str:
    """The installed distribution's version (``esper_core.__version__``)."""
    from esper_core import __version__

    return __version__


def build_info() -> dict[str, str]:
    """The software a run used, recorded in its first event so a report can name it."""
    import torch  # here, not at the top: `esper report` reads runs without paying for PyTorch

    return {"esper_version": esper_version(), "torch_version": torch.__version__,
            "python_version": ".".join(map(str, sys.version_info[:3]))}


class MorphClock:
    """Accumulates wall time spent in the morphogenetic machinery during the current loop iteration.

    A context manager rather than a decorator so that the trainer marks exactly the lines that are
    growth machinery (lifecycle clock, verdicts, merit, policy, germination) and nothing else.
    """

    __slots__ = ("seconds", "_start")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def is_loopback(bind: str) -> bool:
    """Whether an address to bind to is reachable from this machine only (``localhost`` counts)."""
    if bind.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


class RunTelemetry:
    """Metrics, endpoint and anomaly detection of one run; see the module docstring.

    ``record`` appends an event to the run's hash-chained log (the trainer's ``_record``);
    ``seed_counts`` returns the number of slots per lifecycle state. Under torchrun, ``rank`` labels
    every series and each rank serves on ``metrics_port + local_rank`` (port 0 still picks a free one;
    ``rank_urls`` then says which).
    """

    def __init__(self, config: TelemetryConfig, record: Callable[[Event], None],
                 seed_counts: Callable[[], dict[str, int]], instance: str | None = None,
                 rank: int | None = None, local_rank: int = 0) -> None:
        self.config = config
        self.local_rank = local_rank
        self._record = record
        self._seed_counts = seed_counts
        self._cache_seen: dict[str, tuple[int, int]] = {}
        self.detector = AnomalyDetector(AnomalyThresholds(
            window=config.anomaly_window, spike_z=config.anomaly_spike_z,
            stall_improvement=config.anomaly_stall_improvement,
            compile_failure_rate=config.anomaly_compile_failure_rate, memory_growth=config.anomaly_memory_growth))
        wanted = config.metrics_port is not None or config.pushgateway_url is not None
        self.metrics = RunMetrics(esper_version(), rank) if wanted else None
        self.server: MetricsServer | None = None
        self.pusher: Pusher | None = None
        self._instance = instance  # the Pushgateway grouping key; host:pid unless the caller names the run
        self._cache_errors: dict[str, int] = {}
        self.morph = MorphClock()
        self._listeners: list[Listener] = []
        self.rank_urls: list[str] | None = None
        """Under torchrun, every rank's endpoint in rank order (the trainer gathers them after start)."""

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> str | None:
        """Serve the metrics and start pushing them, as configured; returns the endpoint's URL (with the
        port actually bound), or ``None`` when nothing is served."""
        if self.metrics is None:
            return None
        self.metrics.observe_seeds(self._seed_counts())
        self.metrics.active.set(1)
        if self.config.metrics_port is not None:
            bind, port = self.config.metrics_bind, self.config.metrics_port
            port = port + self.local_rank if port else port
            try:
                self.server = MetricsServer(self.metrics.registry, bind, port)
            except OSError as exc:  # port taken or not allowed; an address that is not this machine's
                at_fault = "telemetry.metrics_port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) \
                    else "telemetry.metrics_bind"
                rank = (f" (telemetry.metrics_port + {self.local_rank}: each rank of a node serves on its own "
                        "port, the port plus its LOCAL_RANK)") if self.local_rank and port else ""
                raise ConfigError(Problem(RECIPE_FIELD, f"cannot serve metrics on {bind}:{port}{rank}: "
                                          f"{exc.strerror or exc}", field=at_fault)) from None
            if not is_loopback(bind):
                log.warning("the metrics endpoint %s is exposed beyond this machine (telemetry.metrics_bind="
                            "%s): anyone who can reach it can read this run's metrics; bind 127.0.0.1 unless that is "
                            "intended", self.server.url, bind)
        if self.config.pushgateway_url is not None:
            self.pusher = Pusher(self.metrics.registry, self.config.pushgateway_url, self.config.pushgateway_job,
                                 self.config.pushgateway_every_s, self._instance)
            self.pusher.start()
        return None if self.server is None else self.server.url

    def push(self) -> bool:
        """Push the metrics to the Pushgateway now (besides the periodic and final pushes); ``False``
        when no gateway is configured or the push failed (logged; the run goes on)."""
        return self.pusher.push() if self.pusher is not None else False

    def stop(self) -> None:
        """End of the run (also after a failure): the final push, then the endpoint closes."""
        if self.metrics is not None:
            self.metrics.active.set(0)
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def identity(self) -> dict[str, Any]:
        """Fields for the run's first event: software versions and where its metrics were served."""
        fields: dict[str, Any] = {"versions": build_info()}
        if self.server is not None:
            fields["metrics_url"] = self.server.url
        if self.rank_urls:
            fields["metrics_urls"] = self.rank_urls
        return fields

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every anomaly, after it is recorded (for the governor)."""
        self._listeners.append(listener)

    # --- hooks --------------------------------------------------------------------------------------

    def step_done(self, step: int, seconds: float) -> None:
        """One loop iteration finished; ``seconds`` is its wall time, the morph clock's share of it is
        attributed to the growth machinery."""
        if self.metrics is not None:
            self.metrics.steps.observe(step, seconds, self.morph.seconds)
        self.morph.seconds = 0.0

    def logged(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row (step, loss, params, seed counts): the loss the trainer already read."""
        step, loss = row["step"], row["loss"]
        found = self.detector.observe_loss(step, loss)
        rss = resident_memory_bytes()
        if rss is not None:
            found += self.detector.observe_memory(step, rss)
        if self.metrics is not None:
            self.metrics.loss.set(loss)
            self.metrics.params.set(row["params"])
            self.metrics.observe_seeds({k: row[k] for k in _STATE_KEYS if k in row})
        self._publish(found)

    def validated(self, val_loss: float, metric: str, value: float) -> None:
        """A validation pass: its loss and the task's metric (accuracy also feeds the accuracy gauge)."""
        if self.metrics is not None:
            self.metrics.val_loss.set(val_loss)
            self.metrics.val_metric.labels(metric).set(value)
            if metric == "accuracy":
                self.metrics.val_accuracy.set(value)

    def on_event(self, event: Event) -> None:
        """Every recorded event: counts lifecycle changes and anomalies, refreshes the seed gauge."""
        if self.metrics is None:
            return
        kind = event.get("event")
        if kind == "anomaly":
            self.metrics.observe_anomaly(str(event.get("kind")))
            return
        self.metrics.observe_event(str(kind))
        if "layer" in event:
            self.metrics.observe_seeds(self._seed_counts())

    def compiled(self, step: int, seconds: float, ok: bool) -> None:
        """A kernel compile finished (in the background worker) after ``seconds``; called from the
        training thread, so a failure's anomaly lands in the event log in order."""
        if self.metrics is not None:
            self.metrics.observe_compile(seconds, ok)
        self._publish(self.detector.observe_compile(step, ok))

    def cache_counts(self, tiers: dict[str, dict[str, Any]]) -> None:
        """Publish the kernel cache's cumulative per-tier hits and misses, failed calls and breaker state
        (from ``cache.stats()["tiers"]``)."""
        if self.metrics is None:
            return
        for tier, counters in tiers.items():
            errors = counters.get("errors", 0) + counters.get("timeouts", 0)
            self.metrics.observe_tier(tier, str(counters.get("breaker", "closed")),
                                      errors - self._cache_errors.get(tier, 0))
            self._cache_errors[tier] = errors
            seen_hits, seen_misses = self._cache_seen.get(tier, (0, 0))
            for _ in range(counters["hits"] - seen_hits):
                self.metrics.observe_cache(tier, True)
            for _ in range(counters["misses"] - seen_misses):
                self.metrics.observe_cache(tier, False)
            self._cache_seen[tier] = (counters["hits"], counters["misses"])

    def checkpointed(self, seconds: float) -> None:
        """A checkpoint was committed after ``seconds`` of writing (its age is what operators alert on)."""
        if self.metrics is not None:
            self.metrics.checkpoint_duration.observe(seconds)
            self.metrics.last_checkpoint.set(time.time())

    def _publish(self, found: list[Event]) -> None:
        for event in found:
            self._record(event)
        for event in found:
            for listener in self._listeners:
                listener(event)
