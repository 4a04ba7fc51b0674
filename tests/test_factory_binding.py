"""A run is bound to the code its recipe names (``data.factory``, ``model.factory``): the recipe's hash
covered only its text, so a factory module edited between a checkpoint and ``esper resume`` continued
the run with other code (unseen when the shapes still fitted, a bare size mismatch when they did not).
A resume now refuses a changed module (exit 3, naming it); ``load_run`` warns."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper_core import load_run
from esper_core.checkpoints import store
from esper_core.errors import CheckpointError
from esper_core.training.trainer import Trainer
from run_helpers import copy_at

DATA = """\
import torch
from torch.utils.data import TensorDataset


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())
"""
MODEL = """\
from torch import nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
"""
MODULES = ("bound_data", "bound_model")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run of factories kept beside its recipe, checkpointed at steps 3 and 6."""
    root = tmp_path_factory.mktemp("bound")
    project = root / "project"
    project.mkdir()
    (project / "bound_data.py").write_text(DATA)
    (project / "bound_model.py").write_text(MODEL)
    (project / "recipe.yaml").write_text(
        f"run: {{name: bound, output_dir: {root / 'runs'}}}\n"
        "data: {source: factory, factory: 'bound_data:make', batch_size: 16}\n"
        "model: {arch: factory, factory: 'bound_model:build'}\n"
        f"seeds: {{targets: ['0']}}\npolicy: {{max_seeds: 0}}\nstorage: {{workspace: {root / 'ws'}}}\n"
        "trainer: {max_steps: 6, eval_every: 3}\ncheckpoint: {every_steps: 3}\ntelemetry: {progress: none}\n")
    try:
        return Path(Trainer.from_recipe(project / "recipe.yaml").fit()["run_dir"])
    finally:
        _forget()


def _forget() -> None:
    """Drop the factory modules, so the next import reads their files again (as a new process would)."""
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def project(finished: Path) -> Iterator[Path]:
    """The run's project directory; the factory files are restored after each test edits them."""
    directory = finished.parent.parent / "project"
    yield directory
    _forget()
    (directory / "bound_data.py").write_text(DATA)
    (directory / "bound_model.py").write_text(MODEL)


def _esper(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_SIGNING_KEY"}
    return subprocess.run([sys.executable, "-m", "esper_cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _short(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_a_model_factory_edited_keeping_its_shapes_is_refused_at_resume(finished: Path, project: Path,
                                                                      tmp_path: Path) -> None:
    copy = copy_at(finished, tmp_path, 3)
    model = project / "bound_model.py"
    recorded = _short(model)
    model.write_text(MODEL.replace("nn.ReLU()", "nn.Tanh()"))
    result = _esper("resume", "--checkpoint", str(copy))
    assert result.returncode == 3, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {model}: model.factory: module 'bound_model' changed since the run recorded it "
                           f"(sha256 {recorded}… then, {_short(model)}… now)"), line
    assert "restore the module, or start a new run" in line
    assert not (copy / "checkpoints" / store.checkpoint_name(6)).exists()  # refused before training


def test_a_model_factory_edited_to_other_shapes_is_named_not_a_size_mismatch(finished: Path, project: Path,
                                                                           tmp_path: Path) -> None:
    copy = copy_at(finished, tmp_path, 3)
    (project / "bound_model.py").write_text(MODEL.replace("8", "12"))
    with pytest.raises(CheckpointError) as refused:
        Trainer.resume(copy)
    (problem,) = refused.value.problems
    assert problem.field == "model.factory" and "module 'bound_model' changed" in problem.message, problem


def test_an_unchanged_factory_resumes_bit_exactly_and_is_recorded(finished: Path, project: Path,
                                                                 tmp_path: Path) -> None:
    state = json.loads((finished / "checkpoints" / store.checkpoint_name(3) / store.STATE).read_text())
    assert state["recipe_code"] == {
        name: {"file": str(project / f"{name}.py"), "sha256": hashlib.sha256((project / f"{name}.py").read_bytes())
               .hexdigest()} for name in MODULES}
    copy = copy_at(finished, tmp_path, 3)
    shutil.rmtree(copy / "final")
    Trainer.resume(copy).fit()
    assert (copy / "final/model.safetensors").read_bytes() == (finished / "final/model.safetensors").read_bytes()
    manifest = json.loads((copy / "final" / "manifest.json").read_text())
    assert manifest["recipe_code"] == state["recipe_code"]


def test_a_data_factory_edited_is_refused_at_resume(finished: Path, project: Path, tmp_path: Path) -> None:
    copy = copy_at(finished, tmp_path, 3)
    (project / "bound_data.py").write_text(DATA.replace("manual_seed(0)", "manual_seed(1)"))
    with pytest.raises(CheckpointError) as refused:
        Trainer.resume(copy)
    (problem,) = refused.value.problems
    assert problem.source == str(project / "bound_data.py") and problem.field == "data.factory", problem
    assert "module 'bound_data' changed since the run recorded it" in problem.message


def test_a_factory_module_moved_with_its_code_unchanged_resumes(finished: Path, project: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes are the code, not the path: a project moved (or a run resumed on another machine) resumes."""
    copy = copy_at(finished, tmp_path, 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "bound_model.py").rename(elsewhere / "bound_model.py")  # the same bytes, another file
    monkeypatch.syspath_prepend(str(elsewhere))
    Trainer.resume(copy).fit()
    resumed = json.loads((copy / "final" / "manifest.json").read_text())
    assert resumed["recipe_code"]["bound_model"]["file"] == str(elsewhere / "bound_model.py")


def test_a_factory_module_moved_and_edited_is_refused(finished: Path, project: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_at(finished, tmp_path, 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "bound_model.py").write_text(MODEL.replace("nn.ReLU()", "nn.Tanh()"))
    (project / "bound_model.py").unlink()
    monkeypatch.syspath_prepend(str(elsewhere))
    with pytest.raises(CheckpointError) as refused:
        Trainer.resume(copy)
    (problem,) = refused.value.problems
    assert problem.message.startswith(f"module 'bound_model' is now imported from {elsewhere / 'bound_model.py'}, "
                                      f"whose code is not that of {project / 'bound_model.py'}"), problem


def test_code_of_an_installed_package_is_not_bound(tmp_path: Path) -> None:
    """A loss from torch (``task.function``) is versioned by torch: binding it would refuse every resume
    after an upgrade. The user's own module beside the recipe is bound."""
    from esper_core.recipe.load import load_recipe
    from esper_core.training.factory_sources import module_sources

    (tmp_path / "bound_data.py").write_text(DATA)
    (tmp_path / "recipe.yaml").write_text(
        "data: {source: factory, factory: 'bound_data:make'}\n"
        "task: {kind: custom, function: 'torch.nn.functional:cross_entropy'}\n")
    try:
        assert set(module_sources(load_recipe(tmp_path / "recipe.yaml"))) == {"bound_data"}
    finally:
        _forget()


def test_a_run_recorded_before_its_code_was_still_resumes(finished: Path, project: Path, tmp_path: Path) -> None:
    copy = copy_at(finished, tmp_path, 3)
    checkpoint = copy / "checkpoints" / store.checkpoint_name(3)
    state = json.loads((checkpoint / store.STATE).read_text())
    del state["recipe_code"]
    (checkpoint / store.STATE).write_text(json.dumps(state))
    manifest = json.loads((checkpoint / store.MANIFEST).read_text())
    data = (checkpoint / store.STATE).read_bytes()
    manifest["files"][store.STATE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / store.MANIFEST).write_text(json.dumps(manifest))
    Trainer.resume(copy).fit()
    resumed = json.loads((copy / "final" / "manifest.json").read_text())
    assert set(resumed["recipe_code"]) == set(MODULES)  # bound from this resume on


def test_load_run_with_an_edited_factory_warns_once_naming_it(finished: Path, project: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (project / "bound_model.py").write_text(MODEL.replace("nn.ReLU()", "nn.Tanh()"))
    capsys.readouterr()
    load_run(finished)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {project / 'bound_model.py'}: model.factory: module "
                                                   "'bound_model' changed since the run recorded it"), lines
    assert lines[0].endswith("the model is rebuilt with code other than the run's")
