"""Resume defects found by review (issue 11, items 7 and 12), each with the test that
would have caught it: checkpoint content is validated after the hash check (a rehashed manifest can
carry anything), and a resume records its overrides as a chained event. (Bad settings such as an
output directory that is a file: tests/test_recipe_hardening.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from esper_core.checkpoints import store
from esper_core.training.trainer import Trainer

RECIPE = """\
run: {name: tiny, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["layers.0"], blueprints: [wide_mlp], rank: 4, incubation_steps: 10, blend_steps: 10,
        probation_steps: 5}
policy: {trigger: periodic, period_steps: 20, growth_window: [0.1, 0.8]}
trainer: {max_steps: 60, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 30, keep: 5}
telemetry: {progress: none}
"""


def esper(*args: str, cwd: Path | None = None, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_SIGNING_KEY"} | ({"ESPER_SIGNING_KEY": key} if key else {})
    return subprocess.run([sys.executable, "-m", "esper_cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    (root / "recipe.yaml").write_text(RECIPE)
    summary = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}",
                                                         f"storage.workspace={root / 'ws'}"]).fit()
    return Path(summary["run_dir"])


def _tampered(finished: Path, tmp_path: Path, edit: Callable[[dict[str, Any], Path], None]) -> Path:
    """A copy of the run whose step-30 checkpoint was edited and then *rehashed* (so it verifies)."""
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    checkpoints = run / "checkpoints"
    for later in checkpoints.glob("step-*"):
        if later.name != store.checkpoint_name(30):
            shutil.rmtree(later)
    (checkpoints / store.LATEST).write_text(store.checkpoint_name(30) + "\n")
    path = checkpoints / store.checkpoint_name(30)
    state = json.loads((path / store.STATE).read_text())
    edit(state, path)
    (path / store.STATE).write_text(json.dumps(state))
    manifest = json.loads((path / store.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / store.MANIFEST).write_text(json.dumps(manifest))
    return run


def _foreign_tensors(state: dict[str, Any], path: Path) -> None:
    tensors = load_file(str(path / store.TENSORS))
    save_file({k.replace("layers.0", "layers.9"): v for k, v in tensors.items()}, str(path / store.TENSORS))


def _tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, Any], Path], None]:
    """Replace one stored tensor (which must exist) by ``change`` of it."""
    def edit(state: dict[str, Any], path: Path) -> None:
        tensors = load_file(str(path / store.TENSORS))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(path / store.TENSORS))
    return edit


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def edit(state: dict[str, Any], path: Path) -> None:
        node = state
        for key in keys[:-1]:
            node = node[key]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return edit


def _rename_layer(state: dict[str, Any], path: Path) -> None:
    layers = state["run"]["controller"]["topology"]["layers"]
    layers["BOGUS"] = layers.pop("layers.0")


@pytest.mark.parametrize("edit, message", [
    (_foreign_tensors, "does not fit this run's model and recipe"),
    (_rename_layer, "does not fit this run's model and recipe"),
    (_set("run", "optimizer", value=KeyError), "no 'optimizer' section"),
    (_set("run", "controller", "topology", "step", value=-50), "the step must be a non-negative integer"),
    (_set("run", "data", "epoch", value=True), "data position"),
    (_set("run", "logs", "events_bytes", value=10**12), "points past the end of events.jsonl"),
    (_set("recipe_overrides", value={"trainer.max_steps": 90}), "recipe_overrides is not a list of overrides"),
    (_set("recipe_overrides", value=["trainer.max_steps=90"]), "with the recorded overrides"),
    (_set("recipe_file_sha256", value="0" * 64), "does not match the recipe hash"),
    (_set("run", "trainer", "last_val", value="0.9"), "trainer.last_val must map metric names to numbers"),
    # an optimizer moment of another shape or dtype failed inside optimizer.step(), a traceback at the first step
    (_tensor("optimizer/state/layers.0.host.weight/exp_avg", lambda t: t[:3]), "does not fit this run's model"),
    (_tensor("optimizer/state/layers.0.host.weight/exp_avg", lambda t: t.half()), "does not fit this run's model"),
    # the governor's snapshot was loaded unchecked, and failed only when a rollback restored it, mid-run
    (_tensor("controller/governor/snapshot/model/layers.0.host.weight", lambda t: t[:3]),
     "does not fit this run's model"),
], ids=["foreign-tensors", "wrong-topology", "no-optimizer", "negative-step", "bool-epoch", "huge-log-cursor",
        "overrides-not-a-list", "overrides-not-the-runs", "wrong-recipe-file-hash", "last-val-not-a-mapping",
        "optimizer-moment-shape", "optimizer-moment-dtype", "governor-snapshot-shape"])
def test_rehashed_but_wrong_checkpoint_content_is_refused_with_exit_3(finished: Path, tmp_path: Path,
                                                                     edit: Any, message: str) -> None:
    run = _tampered(finished, tmp_path, edit)
    events_before = (run / "events.jsonl").stat().st_size
    result = esper("resume", "--checkpoint", str(run))
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert store.checkpoint_name(30) in result.stderr  # names the checkpoint it refused
    assert (run / "events.jsonl").stat().st_size == events_before  # nothing written, nothing truncated


def test_a_resume_records_its_overrides_and_effective_recipe_in_the_chain(finished: Path, tmp_path: Path) -> None:
    run = _tampered(finished, tmp_path, lambda state, path: None)
    trainer = Trainer.resume(run, ["trainer.max_steps=70", "telemetry.progress=none"])
    summary = trainer.fit()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "run_resume"]
    assert len(resumed) == 1 and resumed[0]["overrides"] == ["trainer.max_steps=70", "telemetry.progress=none"]
    assert resumed[0]["recipe_sha256"] == summary["recipe_sha256"] != events[0]["recipe_sha256"]
    assert summary["steps"] == 70


def test_a_run_extended_at_resume_resumes_again_and_exports(finished: Path, tmp_path: Path) -> None:
    """`esper resume RUN trainer.max_steps=N` twice, then `esper export`: the checkpoints written after
    the first resume record the overrides in effect, so the second resume and the export rebuild the
    run's recipe from recipe.yaml (unchanged, as the audit needs it) plus those overrides. Before,
    both refused the run: recipe.yaml no longer had the hash the newer checkpoints recorded."""
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    written = (run / "recipe.yaml").read_bytes()
    first = esper("resume", "--checkpoint", str(run), "trainer.max_steps=90", "checkpoint.every_steps=30")
    assert first.returncode == 0, first.stderr
    second = esper("resume", "--checkpoint", str(run), "trainer.max_steps=100", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["steps"] == 100
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert manifest["recipe_overrides"] == ["trainer.max_steps=90", "checkpoint.every_steps=30",
                                            "trainer.max_steps=100"]
    assert (run / "recipe.yaml").read_bytes() == written
    exported = esper("export", str(run), "--format", "safetensors", "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["within_tolerance"]
    assert esper("report", "--verify", str(run)).returncode == 0


def test_a_recipe_edited_under_recorded_overrides_is_refused(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    assert esper("resume", "--checkpoint", str(run), "trainer.max_steps=90", "checkpoint.every_steps=30").returncode == 0
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("widths:\n  - 16", "widths:\n  - 17"))
    result = esper("resume", "--checkpoint", str(run), "trainer.max_steps=100")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "recipe.yaml" in result.stderr and "does not match the recipe hash" in result.stderr


def test_a_relative_data_path_resolves_against_the_recipe_it_was_trained_from(tmp_path: Path) -> None:
    """`data.path: mine.npz` next to the recipe: the run's saved recipe.yaml lives in the run directory,
    and resume and export resolved the path there ("data file not found")."""
    import numpy as np

    project = tmp_path / "project"
    project.mkdir()
    x = np.random.default_rng(0).normal(size=(400, 12)).astype("float32")
    np.savez(project / "mine.npz", x=x, y=(x[:, 0] > 0).astype("int64"))
    (project / "recipe.yaml").write_text(RECIPE.replace("{source: digits, layout: flat, batch_size: 32}",
                                                        "{source: file, path: mine.npz, batch_size: 32}"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    trained = esper("train", str(project / "recipe.yaml"), f"run.output_dir={tmp_path / 'runs'}",
                    f"storage.workspace={tmp_path / 'ws'}", "trainer.max_steps=30", cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "runs" / "tiny"
    resumed = esper("resume", "--checkpoint", str(run), "trainer.max_steps=60", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    exported = esper("export", str(run), "--json", cwd=elsewhere)
    assert exported.returncode == 0, exported.stderr


def test_a_resume_cannot_shorten_a_run(finished: Path, tmp_path: Path) -> None:
    """It re-finished the run at its old step and rewrote final/ and summary.json, saying nothing."""
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    before = {p.name: p.read_bytes() for p in (run / "summary.json", run / "events.jsonl")}
    result = esper("resume", "--checkpoint", str(run), "trainer.max_steps=40")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: <command line>: trainer.max_steps: 40 is below the checkpoint's step 60; a resume continues a run "
        "and cannot shorten it (a larger value extends it)"]
    assert {p.name: p.read_bytes() for p in (run / "summary.json", run / "events.jsonl")} == before


def test_a_signed_run_resumes_only_with_its_key(tmp_path: Path) -> None:
    """Resumed without the key, a signed run lost its signature silently, and the audit with the key
    then called it tampered with."""
    key, other = "secret-key-one-1234", "secret-key-two-5678"
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    trained = esper("train", str(tmp_path / "recipe.yaml"), f"run.output_dir={tmp_path / 'runs'}",
                    f"storage.workspace={tmp_path / 'ws'}", "trainer.max_steps=30", key=key)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "runs" / "tiny"
    events = (run / "events.jsonl").read_bytes()
    for wrong, said in ((None, "is signed, but ESPER_SIGNING_KEY is not set"), (other, "signed with another key")):
        refused = esper("resume", "--checkpoint", str(run), "trainer.max_steps=40", key=wrong)
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert (run / "events.jsonl").read_bytes() == events
    assert esper("resume", "--checkpoint", str(run), "trainer.max_steps=40", key=key).returncode == 0
    verified = esper("report", "--verify", str(run), "--out", str(tmp_path / "report"), cwd=tmp_path, key=key)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_summary_s_wall_time_counts_every_segment(finished: Path, tmp_path: Path) -> None:
    """A resumed run's summary counted only its last segment (a run resumed for its last steps said
    it trained for a second or two)."""
    run = _tampered(finished, tmp_path, lambda state, path: state["run"]["trainer"].update(wall_time_s=1000.0))
    summary = Trainer.resume(run, ["telemetry.progress=none"]).fit()
    assert 1000.0 < summary["wall_time_s"] < 1000.0 + 120


def test_a_resume_on_changed_data_is_refused(tmp_path: Path) -> None:
    """The data file was overwritten with other values of the same shape: the resume carried on, exit
    0, no longer the run it continued."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "table.npz"
    np.savez(data, x=rng.normal(size=(300, 8)).astype("float32"), y=rng.integers(0, 3, 300))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("{source: digits, layout: flat, batch_size: 32}",
                                     "{source: file, path: table.npz, batch_size: 32}"))
    trained = esper("train", str(recipe), f"run.output_dir={tmp_path / 'runs'}", f"storage.workspace={tmp_path / 'ws'}")
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "runs" / "tiny"
    assert esper("resume", "--checkpoint", str(run), "trainer.max_steps=70").returncode == 0  # the same data: fine
    np.savez(data, x=rng.normal(size=(300, 8)).astype("float32"), y=rng.integers(0, 3, 300))
    events = (run / "events.jsonl").read_bytes()
    refused = esper("resume", "--checkpoint", str(run), "trainer.max_steps=80")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{data}: data.path: changed since" in refused.stderr
    assert (run / "events.jsonl").read_bytes() == events


def _contents(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) by relative name: what "left untouched" compares."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, overrides", [
    ("events.jsonl", []), ("metrics.jsonl", []), (".lock", []), ("checkpoints", []), ("final", []),
    ("final/model.safetensors", []), ("tensorboard", ["telemetry.tensorboard=true"]),
])
def test_a_resume_never_writes_through_a_link_planted_in_the_run(finished: Path, tmp_path: Path, name: str,
                                                                 overrides: list[str]) -> None:
    """A run directory may come from someone else (a tarball, a shared disk). With events.jsonl a link,
    `esper resume` truncated the file it pointed to and appended the resumed run's events to it; the
    metrics, the lock, final/ and the checkpoints and TensorBoard directories were written through
    their links the same way. Each is refused (exit 3, naming it) before anything is written."""
    run = _tampered(finished, tmp_path, lambda state, path: None)  # to resume from step 30 of 60
    victim = tmp_path / "outside" / Path(name).name
    victim.parent.mkdir()
    planted = run / name
    if planted.exists():
        shutil.move(planted, victim)
    else:
        victim.mkdir()
        (victim / "a file of the user's").write_text("keep me\n")
    planted.symlink_to(victim, target_is_directory=victim.is_dir())
    before = _contents(victim)
    result = esper("resume", "--checkpoint", str(run), *overrides)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"{planted}: " in result.stderr and "symbolic link" in result.stderr
    assert _contents(victim) == before and planted.is_symlink()
