"""`esper train --dry-run`, and `--json` results of `esper train` and `esper resume`, run as a user runs
them (subprocesses through the console script, stdout a pipe): a dry run shows what a run would wrap and
grow and writes nothing; `--json` puts exactly one JSON object on stdout and the progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from esper_core.training.trainer import Trainer
from test_cli import DIGITS_CNN, LOCATED, STEP_LINE, run_esper

SMALL = """\
run: {name: small, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16, 16]}
seeds: {targets: ["type:Linear"], blueprints: [lowrank_adapter, span_linear, wide_mlp], rank: 4,
        incubation_steps: 10, blend_steps: 10, probation_steps: 5}
policy: {trigger: periodic, period_steps: 20, growth_window: [0.05, 0.5]}
trainer: {max_steps: 40, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 20}
telemetry: {progress: plain}
"""


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_a_dry_run_shows_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    before = _files(tmp_path)
    shown = run_esper(["train", DIGITS_CNN, "--dry-run", "seeds.per_layer=2"], tmp_path)
    as_json = run_esper(["train", DIGITS_CNN, "--dry-run", "--json", "seeds.per_layer=2"], tmp_path)
    assert shown.returncode == 0 and as_json.returncode == 0, shown.explain() + as_json.explain()
    assert _files(tmp_path) == before  # no run directory, no workspace, no kernel store

    resolved = shown.stdout.split("\ndata: ")[0]
    assert yaml.safe_load(resolved)["seeds"]["per_layer"] == 2  # the recipe with its overrides, as YAML
    plan = json.loads(as_json.stdout)
    assert yaml.safe_load(plan["resolved"]) == yaml.safe_load(resolved)
    trainer = Trainer.from_recipe(DIGITS_CNN, ["seeds.per_layer=2", "run.device=cpu",
                                               f"storage.workspace={tmp_path / 'ws'}"])
    assert [layer["layer"] for layer in plan["layers"]] == list(trainer.manager.layers)
    for layer in plan["layers"]:
        assert layer["slots"] == 2 and layer["layer"] in shown.stdout
        usable = [b["name"] for b in layer["blueprints"]]
        assert usable == trainer.controller.catalog.blueprints_for(layer["layer"])
        assert all(b["params"] > 0 and b["flops"] > 0 for b in layer["blueprints"])
    assert plan["model"]["params"] == trainer.params_initial
    assert plan["budgets"]["growth_window_steps"] == [75, 1050] and "growth from step 75 to 1050" in shown.stdout


def test_a_dry_run_says_which_blueprints_cannot_grow_where(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(SMALL, encoding="utf-8")
    plan = json.loads(run_esper(["train", "small.yaml", "--dry-run", "--json"], tmp_path).stdout)
    layers = {layer["layer"]: layer for layer in plan["layers"]}
    assert list(layers) == ["layers.0", "layers.1", "head"]
    assert "span_linear" in layers["layers.0"]["unusable"]  # no wrapped layer feeds the first one
    assert [b["name"] for b in layers["layers.1"]["blueprints"]] == ["lowrank_adapter", "span_linear", "wide_mlp"]
    assert layers["layers.1"]["blueprints"][1]["reads"] == "layers.0"


def test_a_dry_run_of_a_bad_recipe_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(SMALL.replace("lowrank_adapter, span_linear", "residual_conv"),
                                         encoding="utf-8")
    result = run_esper(["train", "small.yaml", "--dry-run"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.explain()
    match = LOCATED.match(result.stderr.strip().splitlines()[0])
    assert match and (match["file"], match["line"], match["field"]) == ("small.yaml", "4", "seeds.blueprints.0")
    assert not (tmp_path / "runs").exists()


def test_json_results_of_train_and_resume_are_one_object_on_stdout(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(SMALL, encoding="utf-8")
    trained = run_esper(["train", "small.yaml", "--json", "telemetry.progress=auto"], tmp_path)
    assert trained.returncode == 0, trained.explain()
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 40 and summary == json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert any(STEP_LINE.match(line) for line in trained.stderr.splitlines())  # progress went to stderr

    resumed = run_esper(["resume", "--checkpoint", summary["run_dir"], "--json", "trainer.max_steps=60"], tmp_path)
    assert resumed.returncode == 0, resumed.explain()
    assert json.loads(resumed.stdout)["steps"] == 60
    assert f"resuming {summary['run_dir']} at step 40" in resumed.stderr.replace("\n", "")
