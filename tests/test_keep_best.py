"""``checkpoint.keep_best``: ``final/`` holds the model of the best validation, with the seed topology it
had then (here a seed that was later culled), loadable with ``load_run``; the summary names the step and
gives the last step's figures; a resumed run ends with the same ``final/``.

The task's metric is the validation loss of a wide MLP trained with a large constant learning rate: it
overfits the digits, so the loss is lowest early, while a seed germinated at step 10 is on probation
(until its verdict at step 90, which culls it: no seed lowers the loss by a whole nat). The seed learns at
the host's rate (`lr_scale: 1`): at the default twice that, the loss is lowest before it blends in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esper_core import load_run
from esper_core.training.models import count_parameters
from esper_core.training.trainer import Trainer
from run_helpers import copy_at

RECIPE = """\
run: {name: best, seed: 0, device: cpu}
task: {metric: loss}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [128]}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [wide_mlp], rank: 8, per_layer: 1,
        incubation_steps: 10, blend_steps: 10, probation_steps: 60, fossilize_margin: 1.0, embargo_steps: 100000,
        lr_scale: 1.0}
policy: {trigger: periodic, period_steps: 100, growth_window: [0.05, 0.2], max_seeds: 1}
trainer: {max_steps: 200, lr: 0.02, eval_every: 10, log_every: 10, schedule: constant}
checkpoint: {every_steps: 50, keep: 5, keep_best: true}
telemetry: {progress: none}
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("best")
    (root / "recipe.yaml").write_text(RECIPE, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' resumes run (a reduction's rounding depends on the threads)
    try:
        summary = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}"]).fit()
    finally:
        torch.set_num_threads(threads)
    return Path(summary["run_dir"]), summary


def test_final_holds_the_best_validation_model_with_its_own_topology(finished: tuple[Path, dict]) -> None:
    run_dir, summary = finished
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    best_step, best_loss = min(validations, key=lambda v: v[1])
    assert summary["best_step"] == best_step < summary["steps"] == 200
    assert summary["val_loss"] == pytest.approx(best_loss)  # evaluated again, on the model loaded from final/
    manifest = json.loads((run_dir / "final/manifest.json").read_text())
    topology = json.loads((run_dir / "final/topology.json").read_text())
    assert manifest["step"] == topology["step"] == best_step
    assert {s["state"] for s in topology["layers"]["layers.0"]["slots"]} == {"PROBATION"}
    model = load_run(run_dir)
    assert count_parameters(model) == summary["params_final"] > summary["last_step"]["params_final"]
    last = summary["last_step"]
    assert last["step"] == 200 and last["val_loss"] > summary["val_loss"]
    assert summary["seeds"]["probation"] == 1 and summary["fossilized"] == []


def test_a_resumed_run_keeps_the_same_best_model(finished: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, summary = finished
    assert 50 < summary["best_step"] < 100  # the checkpoint below is before the best, the next one after it
    copy = copy_at(run_dir, tmp_path, 50)
    resumed = Trainer.resume(copy).fit()
    assert resumed["best_step"] == summary["best_step"] and resumed["last_step"] == summary["last_step"]
    assert (copy / "final/model.safetensors").read_bytes() == (run_dir / "final/model.safetensors").read_bytes()
    copy_100 = copy_at(run_dir, tmp_path / "later", 100)  # the best model itself restored from a checkpoint
    Trainer.resume(copy_100).fit()
    assert (copy_100 / "final/model.safetensors").read_bytes() == (run_dir / "final/model.safetensors").read_bytes()
