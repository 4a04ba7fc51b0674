"""Experiment trackers (``telemetry.tensorboard``, ``telemetry.mlflow_uri``): what a run writes is read
back with each tool's own reader (TensorBoard's ``EventAccumulator``, MLflow's client) and matches the
run's own ``metrics.jsonl`` and ``events.jsonl``; a resumed run continues the same records; a tracker
that cannot work never fails a run; a missing extra is one located recipe error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from esper_core.errors import ConfigError
from esper_core.extras import EXTRAS
from esper_core.training.trainer import Trainer
from conftest import free_port
from run_helpers import copy_at

RECIPE = """\
run: {name: tracked, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [wide_mlp], rank: 4,
        incubation_steps: 10, blend_steps: 10, probation_steps: 5, fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 20, growth_window: [0.05, 0.5], max_seeds: 2}
trainer: {max_steps: 60, lr: 0.01, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 20}
telemetry: {progress: none, tensorboard: true, mlflow_uri: "sqlite:///{store}", mlflow_experiment: tests}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("{store}", str(tmp_path / "mlflow.db")), encoding="utf-8")
    return path


def _rows(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars(tag)]
    assert len({s for s, _ in steps}) == len(steps), f"{tag}: a step appears twice"
    return dict(steps)


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_tensorboard_and_mlflow_hold_the_runs_figures_events_and_artifacts(recipe: Path, tmp_path: Path) -> None:
    summary = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}"]).fit()
    run_dir = Path(summary["run_dir"])

    losses = _rows(run_dir, "loss")
    assert _scalars(run_dir, "train/loss") == pytest.approx(losses)
    assert _scalars(run_dir, "val/accuracy") == pytest.approx(_rows(run_dir, "val_accuracy"))
    assert _scalars(run_dir, "model/params")[60] == summary["params_final"]
    assert _scalars(run_dir, "seeds/fossilized")[60] == summary["seeds"]["fossilized"] >= 1
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    (germinate, *_) = events.Tensors("events/germinate/text_summary")
    recorded = next(json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
                    if json.loads(line)["event"] == "germinate")
    assert germinate.step == recorded["step"] and recorded["layer"] in germinate.tensor_proto.string_val[0].decode()

    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["trainer.lr"] == "0.01" and run.data.params["seeds.blueprints"] == "['wide_mlp']"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert run.data.metrics["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert run.data.metrics["seeds_fossilized"] == summary["seeds"]["fossilized"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "recipe.yaml", "events.jsonl", "metrics.jsonl", "final"} <= artifacts
    final = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert "final/model.safetensors" in final
    stored = tmp_path / "mlartifacts" / run.info.run_id / "artifacts" / "final"  # beside the database
    assert (stored / "model.safetensors").read_bytes() == (run_dir / "final/model.safetensors").read_bytes()


def test_a_resumed_run_continues_the_same_records(recipe: Path, tmp_path: Path) -> None:
    summary = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}"]).fit()
    copy = copy_at(Path(summary["run_dir"]), tmp_path / "copy", 20)
    Trainer.resume(copy).fit()
    assert _scalars(copy, "train/loss") == pytest.approx(_rows(copy, "loss"))  # steps after 20 once, not twice
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"


def test_a_tracker_that_cannot_start_does_not_fail_the_run(recipe: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    summary = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}", "telemetry.tensorboard=false",
                                           "telemetry.mlflow_uri=unknownscheme://nowhere"]).fit()
    assert summary["steps"] == 60
    assert "warning: experiment tracking is off for this run" in capsys.readouterr().err


def test_an_unreachable_tracking_server_is_switched_off_within_seconds(recipe: Path, tmp_path: Path) -> None:
    """`telemetry.mlflow_uri` on a port where nothing listens: MLflow's client retried each request for
    minutes (a 20-step `esper train` was still waiting at 120 s). The run now says so once and trains: once,
    as docs/training.md says, without urllib3's "Retrying (Retry(total=1, ...))" warning for each retry before
    it (those show with -v)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "esper_cli", "train", str(recipe), "trainer.max_steps=20",
                             f"run.output_dir={tmp_path / 'runs'}", f"storage.workspace={tmp_path / 'ws'}",
                             "telemetry.tensorboard=false", f"telemetry.mlflow_uri=http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("warning: experiment tracking is off for this run") == 1, result.stderr
    assert "Retrying" not in result.stderr and "urllib3" not in result.stderr, result.stderr
    assert elapsed < 60, f"{elapsed:.0f} s"  # start-up and 20 steps take 10-20 s here; the retries took minutes


def test_a_tracker_whose_extra_is_missing_is_a_located_recipe_error(recipe: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRAS, "mlflow", ("esper_module_that_is_not_installed",))
    with pytest.raises(ConfigError) as caught:
        Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}"])
    (problem,) = caught.value.problems
    assert str(problem) == (f"{recipe}:9: telemetry.mlflow_uri: MLflow logs need the optional package "
                            "esper_module_that_is_not_installed: pip install 'esper-morph[mlflow]'")
    assert not (tmp_path / "runs").exists()
