"""The tiered cache under the real commands: remote tiers down or dying never fail a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from esper_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
run: {name: s, seed: 4}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16, 16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [lowrank_adapter, wide_mlp],
        incubation_steps: 10, blend_steps: 10, probation_steps: 5}
policy: {trigger: periodic, period_steps: 15, growth_window: [0.05, 0.8]}
trainer: {max_steps: 100, eval_every: 5, log_every: 5}
telemetry: {progress: none}
"""
UNREACHABLE = {"ESPER_REDIS_URL": "redis://127.0.0.1:1/0",
               "ESPER_DATABASE_URL": "postgresql://esper@127.0.0.1:2/nowhere"}


def test_train_and_compile_succeed_with_every_remote_tier_unreachable(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE + f"storage: {{workspace: {tmp_path / 'ws'}}}\n")
    env = {**os.environ, **UNREACHABLE}
    esper = [sys.executable, "-m", "esper_cli"]
    compiled = subprocess.run([*esper, "compile", str(ROOT / "esper_core/blueprints/library/lowrank_adapter.yaml"),
                               "--for", str(recipe)], capture_output=True, text=True, env=env, timeout=300)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    trained = subprocess.run([*esper, "train", str(recipe), f"run.output_dir={tmp_path / 'runs'}"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (tmp_path / "runs/s/summary.json").exists()
    assert "Traceback" not in trained.stderr + compiled.stderr


def test_redis_dying_mid_run_changes_nothing(tmp_path: Path, private_redis, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    plain = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'plain'}", f"storage.workspace={tmp_path / 'a'}"])
    plain.fit()
    monkeypatch.setenv("ESPER_REDIS_URL", private_redis.url)
    shared = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'redis'}", f"storage.workspace={tmp_path / 'b'}"])
    killed: list[int] = []

    def kill_redis_at_first_growth(event) -> None:
        if event["event"] == "germinate" and not killed:
            private_redis.kill()
            killed.append(event["step"])

    shared.fit(kill_redis_at_first_growth)
    assert killed, "the run must have grown while Redis was up"
    assert (plain.run_dir / "final/model.safetensors").read_bytes() == \
        (shared.run_dir / "final/model.safetensors").read_bytes()
    private_redis.start()


def _mirrored(trainer: Trainer) -> list[str]:
    repository = trainer.kernel_store.repository
    return [record.line for record in repository.events(trainer.recorder.run_id)]


def test_every_event_is_mirrored_into_the_asset_repository(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}", f"storage.workspace={tmp_path / 'ws'}"])
    trainer.fit()
    lines = (trainer.run_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) > 10 and _mirrored(trainer) == lines


def test_events_are_mirrored_into_postgresql(tmp_path: Path, postgres_url: str, monkeypatch):
    monkeypatch.setenv("ESPER_DATABASE_URL", postgres_url)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path / 'runs'}", f"storage.workspace={tmp_path / 'ws'}"])
    trainer.fit()
    assert _mirrored(trainer) == (trainer.run_dir / "events.jsonl").read_text().splitlines()
