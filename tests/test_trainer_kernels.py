"""The trainer gets its kernels from the store or the background compiler, and never waits on one
inside the training loop; a kernel that fails to compile never crashes a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from esper_core.training.dry_run import dry_run
from esper_core.training.trainer import Trainer

RECIPE = """\
run: {name: k, seed: 2, deterministic: DETERMINISTIC}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16, 16]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: BLUEPRINTS, blueprint_dirs: [bps],
        incubation_steps: 10, blend_steps: 10, probation_steps: 5, fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 15, growth_window: [0.02, 0.8]}
trainer: {max_steps: 120, eval_every: 5, log_every: 5}
telemetry: {progress: none}
"""

NOISY = """\
name: noisy_adapter
host: linear
ops:
  - {op: linear, in: in, out: rank}
  - {op: linear, in: rank, out: out}
"""


def _recipe(tmp_path: Path, deterministic: bool, blueprints: str) -> Path:
    (tmp_path / "bps").mkdir(exist_ok=True)
    (tmp_path / "bps" / "noisy_adapter.yaml").write_text(NOISY)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("DETERMINISTIC", str(deterministic).lower()).replace("BLUEPRINTS", blueprints))
    return path


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_cold_kernels_compile_in_the_background_and_no_step_waits(tmp_path):
    recipe = _recipe(tmp_path, False, "[lowrank_adapter, wide_mlp]")
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path}/runs", f"storage.workspace={tmp_path}/ws",
                                           "trainer.max_steps=400"])

    def slow_steps_while_waiting(event) -> None:
        """Stand-in for a bigger model's step time, so the worker can finish within the run."""
        if event["event"] == "progress" and event["seeds"]["germinated"]:
            time.sleep(0.2)

    summary = trainer.fit(slow_steps_while_waiting)
    assert summary["blocked_steps"] == 0
    events = _events(trainer.run_dir)
    assert not any(e["event"] == "kernels_ready" for e in events)  # training did not wait before step 1
    incubated = [e for e in events if e["event"] == "incubate"]
    assert incubated, "germinated seeds must start incubating once their kernels arrive"
    stored = list((tmp_path / "ws" / "kernels").rglob("manifest.json"))
    assert len(stored) == 4  # 2 blueprints x 2 distinct host layers


def test_deterministic_runs_wait_before_step_one_and_then_hit_the_store(tmp_path):
    recipe = _recipe(tmp_path, True, "[lowrank_adapter]")
    overrides = [f"run.output_dir={tmp_path}/runs", f"storage.workspace={tmp_path}/ws"]
    first = Trainer.from_recipe(recipe, overrides)
    first.fit()
    ready = next(e for e in _events(first.run_dir) if e["event"] == "kernels_ready")
    assert ready["step"] == 0 and ready["kernels"] == 2 and ready["unusable"] == []
    second = Trainer.from_recipe(recipe, overrides)
    second.fit()
    assert not second.controller.kernels.worker_started  # every kernel came from the store
    assert (first.run_dir / "final/model.safetensors").read_bytes() == \
        (second.run_dir / "final/model.safetensors").read_bytes()


def test_a_kernel_that_fails_to_compile_is_skipped_and_the_run_completes(tmp_path):
    recipe = _recipe(tmp_path, True, "[noisy_adapter, lowrank_adapter]")
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path}/runs", f"storage.workspace={tmp_path}/ws"])
    summary = trainer.fit()
    events = _events(trainer.run_dir)
    failed = [e for e in events if e["event"] == "kernel_failed"]
    assert {e["layer"] for e in failed} == {"layers.0", "layers.1"}
    assert all(e["blueprint"] == "noisy_adapter" and e["problems"] for e in failed)
    germinated = [e["blueprint"] for e in events if e["event"] == "germinate"]
    assert germinated and set(germinated) == {"lowrank_adapter"}
    assert summary["steps"] == 120


def test_a_blueprint_over_the_growth_budget_is_neither_compiled_nor_shown_usable(tmp_path):
    """One wide_mlp seed (1,072+ parameters here) can never fit policy.max_added_params=1000, yet the run
    compiled, and waited for, its kernels, and the dry run listed it as growable."""
    recipe = _recipe(tmp_path, True, "[wide_mlp, lowrank_adapter]")
    overrides = [f"run.output_dir={tmp_path}/runs", f"storage.workspace={tmp_path}/ws", "trainer.max_steps=20",
                 "policy.max_added_params=1000"]
    plan = dry_run(recipe, overrides)
    assert plan["kernels"] == 2
    for layer in plan["layers"]:
        assert [bp["name"] for bp in layer["blueprints"]] == ["lowrank_adapter"]
        assert layer["unusable"]["wide_mlp"].startswith("one seed adds ")
        assert layer["unusable"]["wide_mlp"].endswith("parameters, more than policy.max_added_params (1,000)")
    trainer = Trainer.from_recipe(recipe, overrides)
    trainer.fit()
    ready = next(e for e in _events(trainer.run_dir) if e["event"] == "kernels_ready")
    assert ready["kernels"] == 2 and ready["unusable"] == []
    stored = [json.loads(p.read_text())["ir"]["name"] for p in (tmp_path / "ws" / "kernels").rglob("manifest.json")]
    assert sorted(stored) == ["lowrank_adapter", "lowrank_adapter"]
