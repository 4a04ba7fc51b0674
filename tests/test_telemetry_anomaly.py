"""The anomaly detector on scripted metric streams, and how RunTelemetry records and publishes findings.

Scripted streams rather than training runs: each case is a few numbers whose verdict is obvious,
so a failure points at the detector, not at what a model happened to learn. Pinned for each kind:
it fires on the anomaly, stays quiet on healthy data, fires once per episode (a persistent problem
is one record, not one per step) and re-arms when the condition clears. For the publisher: an
anomaly is recorded in the event log before any listener (the governor) sees it, so a rollback it
causes always follows its cause in the hash chain.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import generate_latest

from esper_core.recipe.schema import TelemetryConfig
from esper_core.telemetry.anomaly import AnomalyDetector, AnomalyThresholds, resident_memory_bytes
from esper_core.telemetry.run import RunTelemetry

MiB = 2**20


def healthy(n: int, start: float = 2.0) -> list[float]:
    """A loss that falls steadily with a little wobble: never anomalous."""
    return [start * 0.97**i * (1.0 + 0.01 * (-1) ** i) for i in range(n)]


def feed(detector: AnomalyDetector, losses: list[float], first_step: int = 10) -> list[dict[str, Any]]:
    found = []
    for i, loss in enumerate(losses):
        found += detector.observe_loss(first_step + 10 * i, loss)
    return found


def test_healthy_training_raises_nothing() -> None:
    assert feed(AnomalyDetector(), healthy(60)) == []


def test_loss_spike_fires_once_per_episode_and_rearms() -> None:
    detector = AnomalyDetector(AnomalyThresholds(window=20, spike_z=4.0))
    losses = healthy(20)
    assert feed(detector, losses) == []
    first = detector.observe_loss(210, 10.0)
    assert [e["kind"] for e in first] == ["loss_spike"]
    assert first[0]["event"] == "anomaly" and first[0]["step"] == 210 and first[0]["zscore"] > 4.0
    assert "standard deviations" in first[0]["reason"]
    assert detector.observe_loss(220, 10.0) == []  # the same episode
    assert detector.observe_loss(230, losses[-1]) == []  # healthy again: re-armed
    assert [e["kind"] for e in detector.observe_loss(240, 50.0)] == ["loss_spike"]


def test_non_finite_loss_is_a_spike_and_stays_out_of_the_window() -> None:
    detector = AnomalyDetector()
    feed(detector, healthy(10))
    found = detector.observe_loss(110, math.nan)
    assert found[0]["kind"] == "loss_spike" and "not finite" in found[0]["reason"]
    detector.observe_loss(120, healthy(11)[-1])  # recovered: re-armed
    # Had the NaN entered the window, its mean would be NaN and no later spike could be seen.
    assert [e["kind"] for e in detector.observe_loss(130, 50.0)] == ["loss_spike"]


def test_stalled_loss_fires_once_until_it_improves_again() -> None:
    detector = AnomalyDetector(AnomalyThresholds(window=10, stall_improvement=0.01))
    found = feed(detector, healthy(10) + [0.5 + 0.001 * (-1) ** i for i in range(20)])
    assert [e["kind"] for e in found] == ["loss_stall"]
    assert found[0]["logged_since_best"] == 10 and "has not gone 1.00% below its best" in found[0]["reason"]
    found = feed(detector, healthy(10, start=0.45), first_step=1000)  # progress resumes: re-armed
    assert found == []
    assert [e["kind"] for e in feed(detector, [0.2] * 20, first_step=2000)] == ["loss_stall"]


def test_a_noisy_but_improving_loss_is_not_a_stall() -> None:
    """Minibatch noise of +-5% around a loss that falls 2% every 20 logged steps: the level keeps
    setting new bests, so nothing fires (comparing the halves of one window fired 46 times here)."""
    detector = AnomalyDetector(AnomalyThresholds(window=20, stall_improvement=0.01))
    noise = [math.sin(7.3 * i) * 0.05 for i in range(300)]
    losses = [1.35 * 0.99 ** (i / 10) * (1.0 + n) for i, n in enumerate(noise)]
    assert [e["kind"] for e in feed(detector, losses) if e["kind"] == "loss_stall"] == []


def test_compile_failure_rate() -> None:
    detector = AnomalyDetector(AnomalyThresholds(window=4, compile_failure_rate=0.5))
    assert detector.observe_compile(1, True) == []
    assert detector.observe_compile(2, False) == []
    assert detector.observe_compile(3, True) == []  # fewer than 4 builds: too few to judge
    found = detector.observe_compile(4, False)
    assert [e["kind"] for e in found] == ["compile_failures"]
    assert found[0]["failures"] == 2 and found[0]["attempts"] == 4 and found[0]["rate"] == 0.5
    assert detector.observe_compile(5, False) == []  # same episode
    for step in range(6, 9):
        detector.observe_compile(step, True)  # the window recovers: re-armed
    detector.observe_compile(9, False)
    assert [e["kind"] for e in detector.observe_compile(10, False)] == ["compile_failures"]


def test_memory_growth_is_measured_against_a_moving_baseline() -> None:
    detector = AnomalyDetector(AnomalyThresholds(memory_growth=0.5))
    assert detector.observe_memory(10, 100 * MiB) == []  # the baseline
    assert detector.observe_memory(20, 140 * MiB) == []
    found = detector.observe_memory(30, 160 * MiB)
    assert [e["kind"] for e in found] == ["memory_growth"]
    assert found[0]["baseline_bytes"] == 100 * MiB and found[0]["rss_bytes"] == 160 * MiB
    assert detector.observe_memory(40, 200 * MiB) == []  # +25% over the new baseline
    assert [e["kind"] for e in detector.observe_memory(50, 250 * MiB)] == ["memory_growth"]


def test_resident_memory_is_read_from_procfs() -> None:
    rss = resident_memory_bytes()
    assert rss is not None and 10 * MiB < rss < 1 << 40


def test_findings_are_recorded_before_listeners_see_them_and_counted() -> None:
    log: list[tuple[str, dict[str, Any]]] = []

    def record(event: dict[str, Any]) -> None:  # as the trainer's _record does: append, then count
        log.append(("record", event))
        telemetry.on_event(event)

    telemetry = RunTelemetry(TelemetryConfig(metrics_port=0, anomaly_window=10), record, dict)
    telemetry.subscribe(lambda e: log.append(("listener", e)))
    for i, loss in enumerate(healthy(10)):
        telemetry.logged({"step": 10 * (i + 1), "loss": loss, "params": 100})
    log.clear()  # a stall or memory finding from the warm-up is not what this test is about
    telemetry.logged({"step": 110, "loss": 100.0, "params": 100})
    spikes = [(who, e) for who, e in log if e["kind"] == "loss_spike"]
    assert [who for who, _ in spikes] == ["record", "listener"]
    assert spikes[0][1] is spikes[1][1]
    assert telemetry.metrics is not None
    assert 'esper_anomalies_total{kind="loss_spike"} 1.0' in generate_latest(telemetry.metrics.registry).decode()


def test_resident_memory_follows_the_process_through_the_descriptor_it_keeps() -> None:
    """The figure is read again at each call (procfs regenerates it at offset 0), not the first one kept."""
    before = resident_memory_bytes()
    grown = b"\x01" * (64 * MiB)  # written, so resident
    after = resident_memory_bytes()
    assert before is not None and after is not None and after - before > 32 * MiB
    del grown
