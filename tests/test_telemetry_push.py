"""Pushing a run's metrics to a real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``,
started by the test on a free loopback port): a short run's final values stay on the gateway after
the process is done with them, pushes repeat during the run, and a gateway that is down never fails
or stops a run."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, require_tool
from esper_core import Trainer
from esper_core.errors import ConfigError
from esper_core.recipe import load_recipe
from esper_core.recipe.schema import TelemetryConfig
from esper_core.telemetry.run import RunTelemetry

RECIPE = """\
run: {name: pushed, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [lowrank_adapter], rank: 4}
trainer: {max_steps: 30, lr: 0.01, eval_every: 10, log_every: 10}
telemetry: {progress: none}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Pushgateway of the test's own on 127.0.0.1, stopped afterwards. Debian's build persists pushed
    series to /var/lib/prometheus/pushgateway.data by default: a fresh file keeps earlier runs out."""
    binary = require_tool("prometheus-pushgateway", package="prometheus-pushgateway")
    port = free_port()
    state = tmp_path_factory.mktemp("pushgateway")
    log = (state / "gateway.log").open("wb")
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                                f"--persistence.file={state / 'pushgateway.data'}"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("prometheus-pushgateway did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def gateway_values(url: str, name: str) -> dict[str, float]:
    """``{instance: value}`` of the pushed series ``name`` (job esper) that the gateway now serves."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    return {s.labels["instance"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and s.labels.get("job") == "esper"}


def test_a_finished_runs_final_values_stay_on_the_gateway(gateway: str, tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    summary = Trainer.from_recipe(tmp_path / "recipe.yaml", [
        f"run.output_dir={tmp_path / 'runs'}", f"telemetry.pushgateway_url={gateway}",
        "telemetry.pushgateway_every_s=0.2"]).fit()
    assert summary["steps"] == 30
    steps = gateway_values(gateway, "esper_step")
    instance = f"{socket.gethostname()}:{os.getpid()}"
    assert steps == {instance: 30.0}  # the final push came after the last step
    assert gateway_values(gateway, "esper_step_duration_seconds_count")[instance] == 30.0
    assert gateway_values(gateway, "process_resident_memory_bytes")[instance] > 0
    assert not any(name.endswith("_created") for name in _names(gateway))


def _names(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return {s.name for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}


def test_pushes_repeat_during_the_run_and_once_more_at_the_end(gateway: str) -> None:
    config = TelemetryConfig(pushgateway_url=gateway, pushgateway_every_s=0.1)
    telemetry = RunTelemetry(config, lambda event: None, dict, instance="periodic-test")
    assert telemetry.start() is None and telemetry.server is None  # pushing serves nothing locally
    assert telemetry.pusher is not None
    for step in range(1, 6):
        telemetry.step_done(step, 0.01)
        time.sleep(0.15)
    assert telemetry.pusher.pushes >= 4 and telemetry.pusher.failures == 0
    assert gateway_values(gateway, "esper_step")["periodic-test"] >= 4
    telemetry.step_done(6, 0.01)
    assert telemetry.push()
    assert gateway_values(gateway, "esper_step")["periodic-test"] == 6
    telemetry.step_done(7, 0.01)
    telemetry.stop()
    assert gateway_values(gateway, "esper_step")["periodic-test"] == 7


def test_a_gateway_that_is_down_never_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    config = TelemetryConfig(pushgateway_url=f"http://esper:secret-7c1@127.0.0.1:{port}", pushgateway_every_s=0.05)
    telemetry = RunTelemetry(config, lambda event: None, dict)
    with caplog.at_level(logging.WARNING, logger="esper_core.telemetry.push"):
        telemetry.start()
        time.sleep(0.3)
        assert not telemetry.push()
        pusher = telemetry.pusher
        telemetry.stop()
    assert pusher is not None and pusher.failures >= 3 and pusher.pushes == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the run goes on" in warnings[0]  # once per streak of failures
    assert "secret-7c1" not in caplog.text


def test_a_pushgateway_url_that_is_not_http_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("telemetry: {progress: none}",
                                   "telemetry: {progress: none, pushgateway_url: 'localhost:9091'}"), encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_recipe(path)
    assert "telemetry.pushgateway_url" in str(excinfo.value) and f"{path}:6" in str(excinfo.value)
