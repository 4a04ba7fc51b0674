"""The live Prometheus endpoint of a run, scraped while the run is training.

What is pinned, and why:

- the endpoint serves during ``fit`` and is gone after it (a finished run leaves no listener);
- it binds 127.0.0.1 by default, and the port it picked (port 0) is recorded in ``run_start``;
- every family is ``esper_*`` or the standard ``process_*``, counters end in ``_total`` (no
  ``*_created`` series, no duplicate of a histogram's ``_sum``), histograms have the explicit buckets,
  every label takes values from a closed set, and there is an ``esper_build_info``: the conventions
  that keep dashboards and Prometheus storage sane whatever a run does;
- secrets in the environment (database and Redis URLs with passwords, the signing key) never appear
  in a scrape: the run's private registry holds only the run's own metrics;
- where ``promtool`` is installed, it accepts the exposition (CI installs it).

The scrape happens inside an ``on_progress`` callback at a fixed step, on the training thread, while
the server answers from its own thread: deterministic, and a real HTTP request against a live run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import require_tool
from esper_core import Trainer
from esper_core.errors import EsperError
from esper_core.recipe.schema import TelemetryConfig
from esper_core.telemetry.metrics import ANOMALY_KINDS, STATES, STEP_BUCKETS, TIERS, RunMetrics
from esper_core.telemetry.run import RunTelemetry

RECIPE = """\
run: {name: scraped, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], per_layer: 2, blueprints: [lowrank_adapter], rank: 4,
        incubation_steps: 20, blend_steps: 20, probation_steps: 10, embargo_steps: 100000,
        fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 30, growth_window: [0.05, 0.5], max_seeds: 4}
trainer: {max_steps: 120, lr: 0.01, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 60}
telemetry: {progress: none, metrics_port: 0}
storage: {breaker_failures: 2}
"""
"""A seed germinates at step 10 and is fossilized, and a checkpoint written, at step 60, so a scrape
at step 70 sees growth and a checkpoint in the counters. Expected counts are taken from the run's own
event log, so the test does not depend on how many seeds the policy chose to grow. The run's one
kernel costs each remote tier two calls (its lookup and its put): two failures open a breaker."""
SCRAPE_STEP = 70
SECRETS = {
    "ESPER_DATABASE_URL": "postgresql://esper:pg-pw-7f3a9c@db.internal:5432/esper",
    "ESPER_REDIS_URL": "redis://:redis-pw-51be0d@cache.internal:6379/0",
    "ESPER_SIGNING_KEY": "signing-key-e91c4d2a77",
}
SECRET_FRAGMENTS = ("pg-pw-7f3a9c", "redis-pw-51be0d", "signing-key-e91c4d2a77", "db.internal", "cache.internal")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """Train the recipe with secrets in the environment (on one torch thread), scraping the endpoint once mid-run."""
    root = tmp_path_factory.mktemp("scraped")
    (root / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        for key, value in SECRETS.items():
            env.setenv(key, value)
        # A fresh kernel store, so the run compiles its kernel and the compile histogram has it.
        trainer = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}",
                                                             f"storage.workspace={root / 'workspace'}"])
        seen: dict[str, Any] = {}

        def on_progress(event: dict[str, Any]) -> None:
            if event["event"] == "progress" and event["step"] >= SCRAPE_STEP and "text" not in seen:
                server = trainer.recorder.telemetry.server
                assert server is not None
                seen["address"], seen["url"], seen["step"] = server.address, server.url, event["step"]
                with urllib.request.urlopen(server.url, timeout=10) as response:
                    seen["content_type"] = response.headers["Content-Type"]
                    seen["text"] = response.read().decode("utf-8")

        summary = trainer.fit(on_progress)
    lines = (Path(summary["run_dir"]) / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    return seen | {"summary": summary, "run_start": events[0], "events": events}


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_endpoint_binds_loopback_by_default_and_records_its_port(scraped: dict[str, Any]) -> None:
    host, port = scraped["address"]
    assert host == "127.0.0.1" and port > 0
    assert TelemetryConfig().metrics_bind == "127.0.0.1"
    assert scraped["run_start"]["metrics_url"] == f"http://127.0.0.1:{port}/metrics" == scraped["url"]
    assert scraped["content_type"].startswith("text/plain")


def test_endpoint_stops_when_the_run_ends(scraped: dict[str, Any]) -> None:
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(scraped["url"], timeout=2)


def test_scrape_has_the_run_metrics_mid_run(scraped: dict[str, Any]) -> None:
    fams = families(scraped["text"])
    for name in ("esper_build_info", "esper_step_duration_seconds", "esper_train_loss", "esper_val_accuracy_ratio",
                 "esper_seeds", "esper_germinations", "esper_fossilizations", "esper_culls", "esper_rollbacks",
                 "esper_compile_duration_seconds", "esper_kernel_cache_hits", "esper_kernel_cache_misses",
                 "esper_checkpoint_duration_seconds", "esper_morphogenetic_time_ratio", "esper_anomalies"):
        assert name in fams, name

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in fams[family].samples if s.name == sample and s.labels == labels)

    def happened(kind: str) -> int:
        return sum(1 for e in scraped["events"] if e["event"] == kind and e["step"] <= scraped["step"])

    assert value("esper_step", "esper_step") == scraped["step"] - 1  # the scraped step has not ended yet
    assert value("esper_step_duration_seconds", "esper_step_duration_seconds_count") == scraped["step"] - 1
    assert value("esper_germinations", "esper_germinations_total") == happened("germinate") >= 1
    assert value("esper_fossilizations", "esper_fossilizations_total") == happened("fossilize") >= 1
    assert value("esper_culls", "esper_culls_total") == happened("cull")
    assert value("esper_compile_duration_seconds", "esper_compile_duration_seconds_count") == 1  # one kernel
    assert value("esper_checkpoint_duration_seconds", "esper_checkpoint_duration_seconds_count") == 1
    assert 0.0 < value("esper_morphogenetic_time_ratio", "esper_morphogenetic_time_ratio") < 1.0
    assert 0.0 < value("esper_val_accuracy_ratio", "esper_val_accuracy_ratio") <= 1.0
    assert value("esper_train_loss", "esper_train_loss") > 0.0
    assert value("esper_seeds", "esper_seeds", state="fossilized") == happened("fossilize")
    assert sum(s.value for s in fams["esper_seeds"].samples) == 2  # one layer, two slots


PROCESS_FAMILIES = {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                    "process_start_time_seconds", "process_open_fds", "process_max_fds"}


def test_scrape_follows_naming_and_cardinality_rules(scraped: dict[str, Any]) -> None:
    fams = families(scraped["text"])
    assert {name for name in fams if not name.startswith("esper_")} == PROCESS_FAMILIES
    assert "_created" not in scraped["text"]
    for fam in fams.values():
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
    buckets = [s.labels["le"] for s in fams["esper_step_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert [float(b) for b in buckets] == [*STEP_BUCKETS, float("inf")]
    assert {s.labels["state"] for s in fams["esper_seeds"].samples} == set(STATES)
    for name in ("esper_kernel_cache_hits", "esper_kernel_cache_misses"):
        assert {s.labels["tier"] for s in fams[name].samples if "tier" in s.labels} == set(TIERS)
    assert {s.labels["kind"] for s in fams["esper_anomalies"].samples if "kind" in s.labels} == set(ANOMALY_KINDS)
    assert {s.labels["metric"] for s in fams["esper_val_metric"].samples} == {"accuracy"}  # the task's metric
    # No label anywhere carries a run name, a slot or a layer: only the closed sets above.
    allowed = {"state", "tier", "kind", "le", "version", "torch_version", "python_version", "metric"}
    assert {k for fam in fams.values() for s in fam.samples for k in s.labels} <= allowed
    assert "scraped" not in scraped["text"] and "layers.0" not in scraped["text"]
    info = fams["esper_build_info"].samples[0]
    assert info.name == "esper_build_info" and info.value == 1
    assert info.labels["torch_version"] and info.labels["version"]


def test_scrape_exposes_no_secret(scraped: dict[str, Any]) -> None:
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in scraped["text"]
    assert "ESPER_" not in scraped["text"]


def test_no_series_duplicates_another(scraped: dict[str, Any]) -> None:
    fams = families(scraped["text"])
    assert "esper_step_seconds" not in fams  # it was the step histogram's _sum under another name
    assert "esper_resident_memory_bytes" not in fams  # process_resident_memory_bytes says it
    rss = next(s.value for s in fams["process_resident_memory_bytes"].samples)
    assert rss > 50 * 2**20  # a process that has imported torch


def test_operations_series_tell_the_age_of_the_last_step_and_checkpoint(scraped: dict[str, Any]) -> None:
    fams = families(scraped["text"])

    def value(name: str) -> float:
        return next(s.value for s in fams[name].samples)

    checkpoint_event = next(e for e in scraped["events"] if e["event"] == "checkpoint")
    last_step = value("esper_last_step_timestamp_seconds")
    last_checkpoint = value("esper_last_checkpoint_timestamp_seconds")
    assert checkpoint_event["time"] <= last_checkpoint <= last_step <= scraped["run_start"]["time"] + 600
    up = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_tier_up"].samples}
    # SECRETS point the SQL and Redis tiers at hosts that do not exist: their breakers open.
    assert up == {"memory": 1, "disk": 1, "sql": 0, "redis": 0}
    errors = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_errors"].samples}
    assert errors["sql"] >= 1 and errors["redis"] >= 1 and errors["disk"] == 0


def test_promtool_accepts_the_exposition(scraped: dict[str, Any]) -> None:
    result = subprocess.run([require_tool("promtool", package="prometheus"), "check", "metrics"], input=scraped["text"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_a_taken_port_is_a_recipe_error_before_any_run_directory_exists(tmp_path: Path) -> None:
    """It was exit 1 naming "recipe" without the file, and left a run directory holding only its lock,
    so the next run of that name was given another directory."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {name: taken, device: cpu}\ndata: {source: digits, layout: flat}\n"
                      "model: {arch: mlp, widths: [8]}\ntrainer: {max_steps: 5}\n"
                      "telemetry:\n  progress: none\n  metrics_port: 9\n", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        telemetry = RunTelemetry(TelemetryConfig(metrics_port=port), lambda event: None, dict)
        with pytest.raises(EsperError, match=rf"telemetry.metrics_port: cannot serve metrics on 127.0.0.1:{port}"):
            telemetry.start()
        recipe.write_text(recipe.read_text(encoding="utf-8").replace("metrics_port: 9", f"metrics_port: {port}"),
                          encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "esper_cli", "train", str(recipe), f"run.output_dir={tmp_path / 'runs'}",
                               f"storage.workspace={tmp_path / 'ws'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: {recipe}:7: telemetry.metrics_port: cannot serve metrics on "
                                   f"127.0.0.1:{port}: Address already in use")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_metrics_off_serves_nothing() -> None:
    telemetry = RunTelemetry(TelemetryConfig(), lambda event: None, dict)
    assert telemetry.metrics is None and telemetry.start() is None
    assert "metrics_url" not in telemetry.identity()
    telemetry.step_done(1, 0.01)  # hooks are no-ops, not errors, when metrics are off


def test_label_values_outside_the_closed_sets_are_refused_or_folded() -> None:
    metrics = RunMetrics("test")
    with pytest.raises(ValueError, match="unknown cache tier"):
        metrics.observe_cache("s3://bucket/run-42", hit=True)
    metrics.observe_anomaly("a-new-kind-with-an-id-1234")
    fams = families(_exposition(metrics))
    kinds = {s.labels["kind"]: s.value for s in fams["esper_anomalies"].samples if s.name.endswith("_total")}
    assert kinds["other"] == 1 and "a-new-kind-with-an-id-1234" not in kinds


def test_cache_tier_state_and_errors_follow_the_breaker() -> None:
    telemetry = RunTelemetry(TelemetryConfig(metrics_port=0), lambda event: None, dict)
    telemetry.cache_counts({"redis": {"hits": 0, "misses": 0, "errors": 2, "timeouts": 1, "breaker": "open"}})
    telemetry.cache_counts({"redis": {"hits": 0, "misses": 0, "errors": 2, "timeouts": 2, "breaker": "half_open"}})
    assert telemetry.metrics is not None
    fams = families(_exposition(telemetry.metrics))
    errors = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_errors"].samples}
    up = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_tier_up"].samples}
    assert errors["redis"] == 4 and errors["sql"] == 0 and up == {"redis": 1}
    telemetry.cache_counts({"redis": {"hits": 0, "misses": 0, "errors": 5, "timeouts": 2, "breaker": "open"}})
    fams = families(_exposition(telemetry.metrics))
    assert next(s.value for s in fams["esper_kernel_cache_tier_up"].samples) == 0


def test_cache_and_checkpoint_hooks_feed_their_series() -> None:
    telemetry = RunTelemetry(TelemetryConfig(metrics_port=0), lambda event: None, dict)
    telemetry.cache_counts({"memory": {"hits": 0, "misses": 1}, "redis": {"hits": 1, "misses": 0}})
    telemetry.cache_counts({"memory": {"hits": 0, "misses": 1}, "redis": {"hits": 1, "misses": 0}})  # no change
    telemetry.checkpointed(0.2)
    assert telemetry.metrics is not None
    fams = families(_exposition(telemetry.metrics))
    hits = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_hits"].samples if s.name.endswith("_total")}
    misses = {s.labels["tier"]: s.value for s in fams["esper_kernel_cache_misses"].samples
              if s.name.endswith("_total")}
    assert hits == {"memory": 0, "disk": 0, "redis": 1, "sql": 0} and misses["memory"] == 1
    sums = {s.name: s.value for s in fams["esper_checkpoint_duration_seconds"].samples}
    assert sums["esper_checkpoint_duration_seconds_count"] == 1 and sums["esper_checkpoint_duration_seconds_sum"] == 0.2


def _exposition(metrics: RunMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode("utf-8")


def test_a_rank_serves_on_metrics_port_plus_local_rank_with_a_rank_label() -> None:
    with socket.socket() as probe:  # a free pair of ports: P for rank 0, P + 1 for local rank 1
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1] - 1
    telemetry = RunTelemetry(TelemetryConfig(metrics_port=port), lambda event: None, dict, rank=3, local_rank=1)
    url = telemetry.start()
    try:
        assert url == f"http://127.0.0.1:{port + 1}/metrics"
        telemetry.step_done(7, 0.01)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        telemetry.stop()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert samples and all(s.labels.get("rank") == "3" for s in samples)
    assert next(s.value for s in samples if s.name == "esper_step") == 7
