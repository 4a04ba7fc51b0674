"""deploy/: the Prometheus alerting rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), the example Prometheus configuration passes ``promtool check config``, and
every series the rules and the Grafana dashboard query is one Esper exports (so a renamed metric
breaks this test, not a production alert). promtool comes from Debian's ``prometheus`` package; the
tests skip without it, and fail when CI is meant to have it (ESPER_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from conftest import require_tool
from esper_core.telemetry.metrics import RunMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "esper-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "esper-alerts.test.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "esper-dashboard.json"
SERIES = re.compile(r"\b((?:esper|process)_[a-z_]+)\b")
ALERTS = {"EsperTrainingStalled", "EsperLossAnomaly", "EsperRepeatedRollbacks", "EsperCompileFailures",
          "EsperCacheTierDown", "EsperCheckpointStale", "EsperMemoryGrowth"}


def run_promtool(*args: str | Path) -> str:
    done = subprocess.run([require_tool("promtool", package="prometheus"), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def exported_series() -> set[str]:
    """Every sample name a run's registry can expose, including labelled families with no child yet."""
    names = set()
    for family in RunMetrics("test").registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                    "gauge": ("",), "unknown": ("",)}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_promtool_checks_the_rules_and_the_config() -> None:
    assert "SUCCESS: 7 rules found" in run_promtool("check", "rules", RULES)
    assert "is valid prometheus config file syntax" in run_promtool("check", "config", CONFIG)


def test_the_alert_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS)


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert fired == ALERTS


def test_rules_and_dashboard_only_query_series_esper_exports() -> None:
    exported = exported_series()
    for name in ("esper_run_active", "esper_last_step_timestamp_seconds", "esper_last_checkpoint_timestamp_seconds",
                 "esper_kernel_cache_tier_up", "process_resident_memory_bytes"):
        assert name in exported
    queried = {name for rule in rules() for name in SERIES.findall(rule["expr"])}
    queried |= {name for expr in dashboard_expressions() for name in SERIES.findall(expr)}
    assert len(queried) >= 20 and queried <= exported, sorted(queried - exported)


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query as a recording rule (Grafana's $instance sits inside a regex)."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "esper-training" and len(board["panels"]) >= 15
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}
    records = [{"record": f"esper:dashboard_panel_{i}", "expr": expr} for i, expr in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}), encoding="utf-8")
    assert f"SUCCESS: {len(records)} rules found" in run_promtool("check", "rules", path)
    for panel in board["panels"]:
        assert panel["title"] and panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
