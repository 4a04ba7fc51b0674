"""Resume defects found by review (issue 11, items 7 and 12), each with the test that
would have caught it: checkpoint content is validated after the hash check (a rehashed manifest can
carry anything), and a resume records its overrides as a chained event. (Bad settings such as an
output directory that is a file: tests/test_recipe_hardening.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
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


def esper(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esper_cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


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
], ids=["foreign-tensors", "wrong-topology", "no-optimizer", "negative-step", "bool-epoch", "huge-log-cursor"])
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
