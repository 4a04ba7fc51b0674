"""Nissa's Prometheus metrics for one run, and the HTTP endpoint that serves them.

Every run gets its own registry: the global default registry carries anything else a host program
registered, so serving it could leak what the run does not own; a private registry exposes exactly
the series below, the standard ``process_*`` series (CPU, resident memory, open files, start time)
and nothing else (no environment, no paths, no run or seed ids). It never exposes the ``*_created``
series prometheus_client adds to every counter and histogram (a quarter of all lines, and no
dashboard or alert here reads them); they are dropped at collection, without touching the
library's process-wide switch that a host program may rely on.

Conventions (checked by ``promtool check metrics`` in CI): names start with ``esper_``, values are
in base units (seconds, bytes, ratios 0..1), counters end in ``_total``, histograms have explicit
buckets, and every label takes its values from a closed set fixed here, so the number of series is
bounded whatever a run does.
"""

from __future__ import annotations

import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from esper_core.seeds.lifecycle import SeedState

STATES = tuple(s.name.lower() for s in SeedState)
"""Values of the ``state`` label: the lifecycle states, fixed by the enum."""
TIERS = ("memory", "disk", "redis", "sql")
"""Values of the ``tier`` label: the kernel cache tiers of DESIGN's storage section."""
ANOMALY_KINDS = ("loss", "loss_spike", "loss_stall", "compile_failures", "memory_growth", "other")
"""Values of the ``kind`` label: the governor's ``loss`` (a rollback cause), what
:mod:`esper_core.telemetry.anomaly` detects, and ``other`` for any kind added later."""

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Launch-bound GPU steps take a few ms, CPU steps of small models 1-100 ms, eval steps seconds."""
COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Building an eager kernel takes ms; a torch.compile recompilation stall takes 3-15 s (DESIGN)."""
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
UP_BREAKER_STATES = ("closed", "half_open")
"""Breaker states in which a cache tier counts as up (half-open: a trial call is being let through)."""

# Lifecycle events whose occurrences are counted; the value is the counter's name stem.
_COUNTED_EVENTS = {"germinate": "germinations", "fossilize": "fossilizations", "cull": "culls",
                   "rollback": "rollbacks"}


class StepStats(Collector):
    """The per-step series, kept as plain numbers and turned into metric families only when scraped.

    Every training step records its duration here, so this is the hot path: one ``bisect`` and a
    few additions instead of five locked prometheus_client updates. Measured: the locked updates cost
    about 4 us per step in isolation and showed as a 2-3% slower step on a 1.2 ms CPU step in
    ``benchmarks/telemetry.py``; this costs about 0.3 us and measures within 1%. Only the training
    thread writes; a scrape reads a snapshot, which at worst is one step behind in part.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.step = 0
        self.last_step_time = 0.0
        self._clock = clock
        self.count = 0
        self.buckets = [0] * (len(STEP_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.seconds = 0.0
        self.morph_seconds = 0.0

    def observe(self, step: int, seconds: float, morph_seconds: float) -> None:
        self.step = step
        self.last_step_time = self._clock()
        self.buckets[bisect_left(STEP_BUCKETS, seconds)] += 1  # the first bound >= seconds: Prometheus' "le"
        self.count += 1
        self.seconds += seconds
        self.morph_seconds += morph_seconds

    def collect(self) -> Iterator[Metric]:
        buckets, total, morph = list(self.buckets), self.seconds, self.morph_seconds
        cumulative, running = [], 0
        for bound, n in zip((*STEP_BUCKETS, float("inf")), buckets):
            running += n
            cumulative.append((floatToGoString(bound), float(running)))
        yield GaugeMetricFamily("esper_step", "Optimizer steps completed.", value=self.step)
        yield GaugeMetricFamily("esper_last_step_timestamp_seconds", "Unix time at which the last training-loop "
                                "iteration finished (0 before the first); a stalled run stops moving it.",
                                value=self.last_step_time)
        yield HistogramMetricFamily("esper_step_duration_seconds", "Wall time of one training-loop iteration "
                                    "(step, logging, validation, growth).", buckets=cumulative, sum_value=total)
        yield CounterMetricFamily("esper_morphogenetic_seconds", "Wall time spent in the morphogenetic machinery "
                                  "(seed lifecycle, verdicts, merit, policy, germination).", value=morph)
        yield GaugeMetricFamily("esper_morphogenetic_time_ratio", "Share of loop wall time spent in the "
                                "morphogenetic machinery since the run started (0..1).",
                                value=morph / total if total > 0 else 0.0)


class RunMetrics:
    """The metric families of one run. Updating them never touches a tensor: callers pass floats
    they already hold, so no host-device sync is added by telemetry."""

    def __init__(self, version: str, rank: int | None = None) -> None:
        import torch  # here, not at the top: reading a run's files (esper report) needs no PyTorch

        self.registry = RunRegistry(auto_describe=True, rank=rank)
        r = self.registry
        ProcessCollector(registry=r)
        Info("esper_build", "Esper and torch versions of this process.", registry=r).info(
            {"version": version, "torch_version": torch.__version__,
             "python_version": ".".join(map(str, sys.version_info[:3]))})
        self.steps = StepStats()
        r.register(self.steps)
        self.active = Gauge("esper_run_active", "1 while the run trains, 0 once it has stopped (finished, failed "
                            "or interrupted): alerts on a stalled run ignore runs that ended.", registry=r)
        self.loss = Gauge("esper_train_loss", "Training loss at the last logged step.", registry=r)
        self.val_loss = Gauge("esper_val_loss", "Validation loss at the last validation.", registry=r)
        self.val_metric = Gauge("esper_val_metric", "The task's validation metric at the last validation (the `metric` "
                                "label names it: accuracy, rmse, r2, perplexity, token_accuracy or loss).", ["metric"],
                                registry=r)
        self.val_accuracy = Gauge("esper_val_accuracy_ratio", "Validation accuracy at the last validation (0..1).",
                                  registry=r)
        self.params = Gauge("esper_model_parameters", "Parameters in the model, seeds included.", registry=r)
        self.seeds = Gauge("esper_seeds", "Seed slots per lifecycle state.", ["state"], registry=r)
        self.events = {kind: Counter(f"esper_{stem}_total", f"Seed {kind} events.", registry=r)
                       for kind, stem in _COUNTED_EVENTS.items()}
        self.anomalies = Counter("esper_anomalies_total", "Anomalies detected, by kind.", ["kind"], registry=r)
        self.compile_duration = Histogram("esper_compile_duration_seconds", "Wall time to build one kernel.",
                                          buckets=COMPILE_BUCKETS, registry=r)
        self.compile_failures = Counter("esper_compile_failures_total", "Kernel builds that failed.", registry=r)
        self.cache_hits = Counter("esper_kernel_cache_hits_total", "Kernel cache hits, by tier.", ["tier"], registry=r)
        self.cache_misses = Counter("esper_kernel_cache_misses_total", "Kernel cache misses, by tier.", ["tier"],
                                    registry=r)
        self.checkpoint_duration = Histogram("esper_checkpoint_duration_seconds", "Wall time to write one "
                                             "checkpoint.", buckets=CHECKPOINT_BUCKETS, registry=r)
        self.last_checkpoint = Gauge("esper_last_checkpoint_timestamp_seconds", "Unix time at which the last "
                                     "checkpoint was committed (0 before the first).", registry=r)
        self.tier_up = Gauge("esper_kernel_cache_tier_up", "1 while a kernel cache tier is in use, 0 while its "
                             "circuit breaker has it skipped.", ["tier"], registry=r)
        self.tier_errors = Counter("esper_kernel_cache_errors_total", "Failed or timed-out calls to a kernel cache "
                                   "tier.", ["tier"], registry=r)
        # Every labelled series exists from the start, so dashboards and rate() see zeros, not gaps.
        for state in STATES:
            self.seeds.labels(state=state)
        for kind in ANOMALY_KINDS:
            self.anomalies.labels(kind=kind)
        for tier in TIERS:
            self.cache_hits.labels(tier=tier)
            self.cache_misses.labels(tier=tier)
            self.tier_errors.labels(tier=tier)

    def observe_seeds(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.seeds.labels(state=state).set(counts.get(state, 0))

    def observe_event(self, kind: str) -> None:
        counter = self.events.get(kind)
        if counter is not None:
            counter.inc()

    def observe_anomaly(self, kind: str) -> None:
        self.anomalies.labels(kind=kind if kind in ANOMALY_KINDS else "other").inc()

    def observe_compile(self, seconds: float, ok: bool) -> None:
        self.compile_duration.observe(seconds)
        if not ok:
            self.compile_failures.inc()

    def observe_cache(self, tier: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(tier=_closed(tier, TIERS, "cache tier")).inc()

    def observe_tier(self, tier: str, breaker: str, new_errors: int) -> None:
        """A tier's circuit-breaker state and the failed calls since the last observation."""
        name = _closed(tier, TIERS, "cache tier")
        self.tier_up.labels(tier=name).set(1 if breaker in UP_BREAKER_STATES else 0)
        if new_errors > 0:
            self.tier_errors.labels(tier=name).inc(new_errors)


class RunRegistry(CollectorRegistry):
    """A registry whose exposition leaves out prometheus_client's ``*_created`` samples (see the module
    docstring); everything else, including what a scrape and a push send, is the plain registry's.
    ``rank`` (a distributed run's rank) labels every sample ``rank="N"``: one series per rank, bounded
    by the world size, so dashboards can sum or compare the ranks' endpoints."""

    def __init__(self, auto_describe: bool = False, rank: int | None = None) -> None:
        super().__init__(auto_describe=auto_describe)
        self.rank = None if rank is None else str(rank)

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            if self.rank is not None:
                samples = [sample._replace(labels={**sample.labels, "rank": self.rank}) for sample in samples]
            if len(samples) != len(metric.samples) or self.rank is not None:
                trimmed = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                trimmed.samples = samples
                metric = trimmed
            yield metric


def _closed(value: str, allowed: tuple[str, ...], what: str) -> str:
    """Refuse label values outside the closed set: an open label is a cardinality leak."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(allowed)})")
    return value


class MetricsServer:
    """prometheus_client's HTTP server for one registry, bound to one address; stoppable."""

    def __init__(self, registry: CollectorRegistry, bind: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=bind, registry=registry)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the chosen one when asked for port 0)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
