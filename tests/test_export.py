"""Getting a grown model out: ``esper export`` (pt2, safetensors, ONNX), ``load_run`` and merging, on
the zoo MLP and CNN grown with every built-in blueprint.

Two short runs are trained once for the module: an MLP whose ``layers.0`` and ``head`` each grow a
``lowrank_adapter`` and a ``wide_mlp`` seed and ``head`` a ``span_linear`` seed (new hidden units
reading ``layers.0``'s input), and a CNN whose ``blocks.0.conv2`` grows ``se_gate``,
``dwsep_conv``, ``residual_conv`` and the test blueprint ``linear_conv`` (a linear conv seed, so conv
merging is exercised end to end). Growth is forced: a periodic trigger, the ``diversify``
orchestrator (a layer grows each blueprint once), short incubation, blending and probation, and
``fossilize_margin: -1`` (every seed is kept). Kernels are compiled once into a workspace the runs
share. Each run is exported once in each format; the tests read those results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from esper_core import load_run
from esper_core.blueprints.builder import resolve
from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.ir import Blueprint
from esper_core.errors import CheckpointError
from esper_core.export.load import open_run
from esper_core.export.run import held_out_inputs
from esper_core.seeds.kasmina import KasminaLayer
from esper_core.training.models import build_model
from esper_core.training.trainer import Trainer
from run_helpers import esper, rechain, records_of

BLUEPRINTS = Path(__file__).parent / "blueprints"
RECIPE = """\
run: {{name: {name}, seed: 0, device: cpu}}
{data_and_model}
seeds:
  targets: {targets}
  blueprints: {blueprints}
  per_layer: {per_layer}
  rank: 2
  incubation_steps: 10
  blend_steps: 10
  probation_steps: 5
  embargo_steps: 100000
  fossilize_margin: -1.0
  blueprint_dirs: ["{blueprint_dir}"]
policy: {{trigger: periodic, period_steps: 15, growth_window: [0.05, 0.7], max_seeds: 4, orchestrator: diversify,
          merit_ratio: 0.0}}
trainer: {{max_steps: 150, lr: 0.01, eval_every: 10, log_every: 10}}
checkpoint: {{every_steps: {checkpoint_every}, keep: 100}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""
RUNS = {
    "mlp": {"data_and_model": "data: {source: digits, layout: flat, batch_size: 32}\nmodel: {arch: mlp, widths: [16]}",
            "targets": '["layers.0", "head"]', "blueprints": "[lowrank_adapter, wide_mlp, span_linear]", "per_layer": 3,
            "checkpoint_every": 25},
    "cnn": {"data_and_model": "data: {source: digits, layout: image, batch_size: 32}\nmodel: {arch: cnn, channels: [4, 8]}",
            "targets": '["blocks.0.conv2"]', "blueprints": "[residual_conv, dwsep_conv, se_gate, linear_conv]",
            "per_layer": 4, "checkpoint_every": 5},
}
FORMATS = ("pt2", "safetensors", "onnx")
MERGEABLE = {"lowrank_adapter", "linear_conv"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trainer]:
    root = tmp_path_factory.mktemp("grown")
    trained = {}
    for kind, fields in RUNS.items():
        path = root / f"{kind}.yaml"
        path.write_text(RECIPE.format(name=kind, blueprint_dir=BLUEPRINTS, workspace=root / "workspace", **fields),
                        encoding="utf-8")
        trainer = Trainer.from_recipe(path, [f"run.output_dir={root / 'runs'}"])
        trainer.fit()
        trained[kind] = trainer
    return trained


@pytest.fixture(scope="module")
def exports(runs: dict[str, Trainer]) -> dict[tuple[str, str], dict[str, Any]]:
    results = {}
    for kind, trainer in runs.items():
        for fmt in FORMATS:
            done = esper("export", trainer.run_dir, "--format", fmt, "--json")
            assert done.exit_code == 0, done.output
            results[kind, fmt] = json.loads(done.stdout)
    return results


def test_every_seed_kind_was_grown_and_kept(runs: dict[str, Trainer]) -> None:
    grown = {s.blueprint for t in runs.values() for layer in t.manager.layers.values() for s in layer.slots
             if s.state.name == "FOSSILIZED"}
    assert grown == {"lowrank_adapter", "wide_mlp", "span_linear", "residual_conv", "dwsep_conv", "se_gate", "linear_conv"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(RUNS))
def test_each_format_reproduces_the_trained_model_on_held_out_data(exports: dict, kind: str, fmt: str) -> None:
    result = exports[kind, fmt]
    assert result["within_tolerance"] and result["samples"] > 100
    assert result["max_abs_diff"] <= result["tolerance"] <= 1e-5 * 100  # relative to the outputs: logits below 100
    assert all(Path(f["path"]).is_file() and Path(f["path"]).stat().st_size == f["bytes"] for f in result["files"])
    assert Path(result["out"]) == Path(result["run_dir"]) / "exports" / fmt


@pytest.mark.parametrize("kind", list(RUNS))
def test_merged_parameter_counts_are_what_the_blueprints_predict(exports: dict, kind: str) -> None:
    result = exports[kind, "pt2"]
    source = json.loads((Path(result["run_dir"]) / "final" / "topology.json").read_text(encoding="utf-8"))
    predicted = 0
    for layer in source["layers"].values():
        for slot in layer["slots"]:
            if slot["state"] != "FOSSILIZED":
                continue
            if slot["merged"]:  # folded into its host when it was fossilized (seeds.merge_linear)
                assert slot["blueprint"] in MERGEABLE and slot["params"] == 0
                continue
            resolved = resolve(Blueprint.model_validate(slot["ir"]), HostSpec.from_json(slot["target"]["host"]),
                               slot["target"]["rank"])
            assert resolved.params == slot["params"]
            predicted += 0 if slot["blueprint"] in MERGEABLE else resolved.params  # a merged seed adds nothing
    params = result["parameters"]
    assert params["exported"] == params["host"] + predicted <= params["trained"]  # merged in training or here
    actions = {s["blueprint"]: s["action"] for s in result["seeds"]}
    assert {bp for bp, action in actions.items() if action == "merged"} == MERGEABLE & set(actions)


def test_no_merge_keeps_every_seed_as_a_branch_and_still_reproduces(runs: dict[str, Trainer]) -> None:
    done = esper("export", runs["mlp"].run_dir, "--format", "safetensors", "--no-merge", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["within_tolerance"] and result["out"].endswith("safetensors-unmerged")
    assert result["parameters"]["exported"] == result["parameters"]["trained"]
    # every seed still a module stays a branch; the low-rank ones folded into the host while training are
    # listed as merged (--no-merge cannot take them back out)
    assert {(s["action"], s["reason"]) for s in result["seeds"] if s["action"] != "branch"} == {
        ("merged", "fossilized; folded into the host during training")}
    assert any(s["action"] == "branch" for s in result["seeds"])
    arch = json.loads((Path(result["out"]) / "architecture.json").read_text(encoding="utf-8"))
    assert set(arch["grown_layers"]) == {"layers.0", "head"} and not arch["original_keys"]
    keys = load_file(str(Path(result["out"]) / "model.safetensors"))
    assert not any(k.endswith("alpha") or ".seeds." in k for k in keys)


def test_pt2_programs_run_in_a_process_that_never_imports_esper(runs: dict[str, Trainer], exports: dict,
                                                                tmp_path: Path) -> None:
    cases = []
    for kind, trainer in runs.items():
        run = open_run(trainer.run_dir)
        x = held_out_inputs(run, 64)
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(x)
        save_file({"x": x.contiguous(), "y": expected.contiguous()}, str(tmp_path / f"{kind}.safetensors"))
        cases.append((exports[kind, "pt2"]["files"][0]["path"], str(tmp_path / f"{kind}.safetensors")))
    script = """
import sys, json, torch
from safetensors.torch import load_file
worst = 0.0
for program, data in json.loads(sys.argv[1]):
    module = torch.export.load(program).module()
    tensors = load_file(data)
    for n in (1, 7, tensors["x"].shape[0]):  # the batch dimension is dynamic
        out = module(tensors["x"][:n])
        worst = max(worst, float((out - tensors["y"][:n]).abs().max()))
assert not any(name == "esper_core" or name.startswith("esper_") for name in sys.modules), "esper was imported"
print(worst)
"""
    done = subprocess.run([sys.executable, "-I", "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-4


def test_load_run_round_trips_the_final_model_and_any_checkpoint(runs: dict[str, Trainer]) -> None:
    trainer = runs["cnn"]
    loaded = load_run(trainer.run_dir)
    assert any(isinstance(m, KasminaLayer) for m in loaded.modules()) and not loaded.training
    trained = trainer.model.eval().state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    x = held_out_inputs(open_run(trainer.run_dir), 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trainer.model(x))
    from esper_core.checkpoints.store import load as load_checkpoint
    from esper_core.growth.state import join

    checkpoint = load_checkpoint(trainer.run_dir / "checkpoints" / "step-00000050")
    recorded = join(checkpoint.tensors, checkpoint.state["run"])["model"]
    early = load_run(trainer.run_dir, checkpoint="step-00000050")
    assert early.state_dict().keys() == recorded.keys()
    assert all(torch.equal(v, recorded[k]) for k, v in early.state_dict().items())


EARLY = {"mlp": "step-00000050", "cnn": "step-00000005"}
"""Checkpoints at which nothing grew beyond the host: at step 50 the MLP's two fossilized low-rank seeds
were merged into their hosts when fossilized and its other seeds contribute nothing yet (one incubating, one blending at alpha 0); at
step 5 the CNN has not germinated anything."""


@pytest.mark.parametrize("kind", list(RUNS))
def test_safetensors_keys_are_the_original_models_when_nothing_grew_beyond_it(runs: dict[str, Trainer],
                                                                              kind: str, tmp_path: Path) -> None:
    """The user's own model class (the zoo model built from the recipe) loads the export strictly."""
    trainer = runs[kind]
    done = esper("export", trainer.run_dir, "--format", "safetensors", "--checkpoint", EARLY[kind],
                 "--out", tmp_path / "out", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["original_keys"] and result["within_tolerance"]
    if kind == "mlp":
        # the two fossilized low-rank seeds were folded into their hosts in training: no module left
        assert sorted(s["action"] for s in result["seeds"]) == ["dropped", "dropped", "merged", "merged"]
    data = trainer.data
    with torch.random.fork_rng():
        original = build_model(trainer.loaded.recipe.model, data.input_shape, data.num_classes)
    original.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    reference = load_run(trainer.run_dir, checkpoint=EARLY[kind])
    x = held_out_inputs(open_run(trainer.run_dir), 64)
    with torch.no_grad():
        assert (original.eval()(x) - reference(x)).abs().max() <= result["tolerance"]


def test_live_seeds_are_exported_with_their_current_alpha_and_a_warning(runs: dict[str, Trainer]) -> None:
    trainer = runs["mlp"]
    done = esper("export", trainer.run_dir, "--format", "pt2", "--checkpoint", "step-00000025", "--json",
                 "--out", trainer.run_dir / "exports" / "live")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    live = [s for s in result["seeds"] if s["state"] in ("BLENDING", "PROBATION")]
    assert live and all(s["action"] == "branch" for s in live)
    assert result["within_tolerance"] and len(result["warnings"]) == len(live)
    assert all("is live" in w for w in result["warnings"])


def test_a_damaged_or_missing_run_is_one_line_and_exit_3(runs: dict[str, Trainer], tmp_path: Path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(runs["mlp"].run_dir, damaged, ignore=shutil.ignore_patterns("checkpoints", "exports"))
    weights = damaged / "final" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    for target, named in ((damaged, "model.safetensors"), (tmp_path / "nowhere", "not a run directory")):
        done = esper("export", target, "--format", "safetensors")
        assert done.exit_code == 3
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.output
    with pytest.raises(CheckpointError, match="sha256"):
        load_run(damaged)


def test_a_final_model_without_its_manifest_loads_only_if_the_run_predates_manifests(
        runs: dict[str, Trainer], tmp_path: Path) -> None:
    """With final/manifest.json deleted (and the weights then free to be swapped), load_run and esper
    export loaded final/ unverified with a "written before final/ had a manifest" warning, although the
    run's own chained run_end event records the manifest's sha256: the run was written with one. A run
    whose run_end binds no manifest (written before manifests existed) still loads, with the warning."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["mlp"].run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "exports"))
    manifest = run / "final" / "manifest.json"
    manifest.unlink()
    done = esper("export", run, "--format", "safetensors")
    assert done.exit_code == 3 and "Traceback" not in done.output, done.output
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {manifest}: missing, but the run's run_end event") and "events.jsonl:" in line
    assert not (run / "exports").exists()
    with pytest.raises(CheckpointError, match="run_end"):
        load_run(run)
    records = records_of(run)
    del records[-1]["artifacts"]["final/manifest.json"]  # as runs recorded it before final/ had a manifest
    rechain(run, records)
    warnings: list[str] = []
    assert open_run(run, warn=warnings.append).model is not None
    assert len(warnings) == 1 and "written before final/ had a manifest" in warnings[0]


@pytest.mark.parametrize("planted", ["exports", "exports/safetensors"])
def test_an_export_never_writes_through_a_link_planted_in_the_run(runs: dict[str, Trainer], tmp_path: Path,
                                                                  planted: str) -> None:
    """A run directory may come from someone else: with exports/ (or exports/safetensors/) a link to
    another directory, `esper export` wrote the model, architecture.json and export.json there."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["mlp"].run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "exports"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / planted).parent.mkdir(parents=True, exist_ok=True)
    (run / planted).symlink_to(elsewhere, target_is_directory=True)
    done = esper("export", run, "--format", "safetensors")
    assert done.exit_code == 2 and "Traceback" not in done.output, done.output
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {run / planted}: a symbolic link in place of the run's own exports directory")
    assert list(elsewhere.iterdir()) == []


def test_an_s3_url_in_an_error_is_the_whole_url_without_its_secrets() -> None:
    # Each is refused before any request is made: no store is needed.
    for url, code, said in (
            ("s3://", 2, "error: s3://: 's3://' is not an s3://BUCKET/PREFIX URL"),
            ("s3://AKIA:topsecret@bucket", 3, "error: s3://AKIA:***@bucket: names a bucket, not a run"),
            ("s3://bucket/run?aws_secret_access_key=topsecret", 2,
             "error: s3://bucket/run?aws_secret_access_key=***: unknown URL parameter(s) aws_secret_access_key")):
        done = esper("export", url)
        assert done.exit_code == code, done.output
        assert done.stderr.startswith(said) and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "topsecret" not in done.output


def test_onnx_without_its_extra_is_one_line_and_exit_2(runs: dict[str, Trainer], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    done = esper("export", runs["mlp"].run_dir, "--format", "onnx")
    assert done.exit_code == 2
    assert done.stderr.strip() == ("error: --format onnx: ONNX export need the optional package onnxscript: "
                                   "pip install 'esper-morph[onnx]'")


def test_out_never_deletes_what_an_export_did_not_write(runs: dict[str, Trainer], tmp_path: Path) -> None:
    run_dir = runs["mlp"].run_dir
    mine = tmp_path / "important"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious", encoding="utf-8")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for out, said in ((mine, "notes.txt"), (run_dir, "events.jsonl"), (mine / "notes.txt", "is a file"),
                      (mine / "notes.txt" / "sub", "cannot create")):
        done = esper("export", run_dir, "--format", "pt2", "--out", out)
        assert done.exit_code == 2, done.output
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --out") and said in lines[0], lines
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    fresh = tmp_path / "fresh"
    for _ in range(2):  # an earlier export's directory is reused: its files are replaced
        done = esper("export", run_dir, "--format", "pt2", "--out", fresh)
        assert done.exit_code == 0, done.output
    assert sorted(p.name for p in fresh.iterdir()) == ["export.json", "model.pt2"]


def test_one_held_out_sample_is_enough_to_export_and_check(runs: dict[str, Trainer], tmp_path: Path) -> None:
    """A batch of one was traced as the constant 1 and the dynamic batch dimension failed to export
    (a traceback, exit 1): with --samples 1, or a validation split of one sample."""
    done = esper("export", runs["mlp"].run_dir, "--format", "pt2", "--samples", "1", "--out", tmp_path / "one",
                 "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["samples"] == 1 and result["within_tolerance"]


def test_the_export_says_how_inputs_were_standardised(runs: dict[str, Trainer], tmp_path: Path) -> None:
    """Inputs are standardised with the training split's statistics (data.standardize, the default),
    which nothing exported recorded: a user feeding raw features got wrong answers without a word."""
    from esper_core.training.data import build_data

    done = esper("export", runs["mlp"].run_dir, "--format", "pt2", "--out", tmp_path / "out", "--json")
    stats = json.loads(done.stdout)["input_standardization"]
    assert stats["formula"] == "(x - mean) / std" and stats["shape"] == [64] and len(stats["std"]) == 64
    recipe = runs["mlp"].loaded.recipe
    raw = build_data(recipe.data.model_copy(update={"standardize": False}), recipe.run.seed, Path("."))
    x = raw.val.tensors[0][:8]
    expected = runs["mlp"].data.val.tensors[0][:8]
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    assert torch.allclose((x - mean) / std, expected, atol=1e-5)


def test_a_checkpoint_s_export_never_replaces_the_final_model_s(runs: dict[str, Trainer]) -> None:
    """Both went to RUN/exports/FORMAT, the second silently replacing the first; a negative tolerance
    was accepted and failed every export."""
    run_dir = runs["mlp"].run_dir
    name = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))[0]
    final = esper("export", run_dir, "--format", "pt2", "--json")
    early = esper("export", run_dir, "--format", "pt2", "--checkpoint", name, "--json")
    assert final.exit_code == early.exit_code == 0, early.output
    assert json.loads(early.stdout)["out"] == str(run_dir / "exports" / f"pt2-{name}")
    assert (run_dir / "exports" / "pt2" / "model.pt2").is_file() and json.loads(final.stdout)["out"] == str(
        run_dir / "exports" / "pt2")
    assert esper("export", run_dir, "--tolerance", "-1").exit_code == 2
