"""Early stopping (``trainer.early_stopping``): the run stops after ``patience`` validations without an
improvement of ``min_delta`` in the watched metric, never inside the growth window unless asked, records
the stop as a chained event and in the summary, resumes to the same stop, and refuses a metric the task
does not report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper_core.errors import ConfigError
from esper_core.training.trainer import Trainer
from run_helpers import copy_at

RECIPE = """\
run: {name: stop, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [wide_mlp], rank: 4,
        incubation_steps: 10, blend_steps: 10, probation_steps: 5, fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 20, growth_window: [0.05, 0.3], max_seeds: 1}
trainer: {max_steps: 400, lr: 0.01, eval_every: 10, log_every: 10,
          early_stopping: {patience: 2, min_delta: 0.01}}
checkpoint: {every_steps: 40, keep: 20}
telemetry: {progress: none}
"""
"""The growth window closes at step 120 (0.3 x 400); the digits MLP gains less than one accuracy
point per validation long before step 400."""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE, encoding="utf-8")
    return path


def _fit(recipe: Path, out: Path, *overrides: str) -> dict:
    return Trainer.from_recipe(recipe, [f"run.output_dir={out}", *overrides]).fit()


def _validations(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["val_accuracy"]) for row in rows if "val_accuracy" in row]


def test_the_run_stops_after_patience_validations_past_the_growth_window(recipe: Path, tmp_path: Path) -> None:
    summary = _fit(recipe, tmp_path / "runs")
    run_dir = Path(summary["run_dir"])
    stop = summary["early_stop"]
    assert stop is not None and summary["steps"] == stop["step"] < 400
    validations = _validations(run_dir)
    assert validations[-1][0] == stop["step"]
    best, best_step, waited = validations[0][1], validations[0][0], 0
    for step, value in validations[1:]:  # the documented rule, replayed on the recorded validations
        if value > best + 0.01:
            best, best_step, waited = value, step, 0
        elif step >= 120:  # counted only once the growth window (until 0.3 x 400) has closed
            waited += 1
    assert waited == 2 and stop["step"] >= 120 + 10
    assert (stop["best_step"], stop["best"], stop["metric"]) == (best_step, best, "accuracy")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][-2:] == ["early_stop", "run_end"]
    assert {k: v for k, v in events[-2].items() if k not in ("event", "seq", "prev", "time")} == stop


def test_inside_the_growth_window_patience_counts_only_when_asked(recipe: Path, tmp_path: Path) -> None:
    window = ["policy.growth_window=[0.05, 0.9]", "trainer.early_stopping={patience: 1, min_delta: 0.05}"]
    patient = _fit(recipe, tmp_path / "patient", *window)
    assert patient["early_stop"] is None or patient["early_stop"]["step"] >= 360  # 0.9 x 400
    eager = _fit(recipe, tmp_path / "eager", *window[:1],
                 "trainer.early_stopping={patience: 1, min_delta: 0.05, during_growth: true}")
    assert eager["early_stop"] is not None and eager["steps"] < 360


def test_a_resumed_run_stops_at_the_same_step_with_the_same_model(recipe: Path, tmp_path: Path) -> None:
    summary = _fit(recipe, tmp_path / "runs")
    run_dir = Path(summary["run_dir"])
    resume_at = max(s for s in (40, 80, 120, 160) if s < summary["early_stop"]["best_step"])
    copy = copy_at(run_dir, tmp_path / "copy", resume_at)
    resumed = Trainer.resume(copy).fit()
    assert resumed["early_stop"] == summary["early_stop"]
    assert (copy / "final/model.safetensors").read_bytes() == (run_dir / "final/model.safetensors").read_bytes()


def test_a_metric_the_task_does_not_report_is_a_located_recipe_error(recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}",
                                     "trainer.early_stopping={patience: 2, metric: rmse}"])
    (problem,) = caught.value.problems
    assert problem.field == "trainer.early_stopping.metric" and "'rmse' is not reported by task kind " \
        "'classification' (choose from accuracy, loss)" in str(problem)
    assert not (tmp_path / "runs").exists()
