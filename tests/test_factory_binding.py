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
from run_helpers import copy_at, esper, esper_report

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


# --- what a user sees of the binding: the dry run before training, the report after -----------------

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_dry_run_shows_the_code_the_run_would_bind(finished: Path, project: Path) -> None:
    """Before training, the user sees which files the run will depend on, where and with which bytes:
    a path relative to the recipe's directory (the recorded one is absolute), and the full sha256."""
    recipe = project / "recipe.yaml"
    plain = esper("train", recipe, "--dry-run")
    assert plain.exit_code == 0, plain.output
    assert "code the run binds (a resume refuses it edited; paths relative to the recipe's directory):" \
        in plain.stdout, plain.stdout
    for name, field in (("bound_data", "data.factory"), ("bound_model", "model.factory")):
        assert f"  {name} ({field}): {name}.py, sha256 {_digest(project / f'{name}.py')}" in plain.stdout
    _forget()
    as_json = esper("train", recipe, "--dry-run", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["code"] == {
        name: {"field": field, "file": str(project / f"{name}.py"), "path": f"{name}.py",
               "sha256": _digest(project / f"{name}.py")}
        for name, field in (("bound_data", "data.factory"), ("bound_model", "model.factory"))}


@pytest.mark.filterwarnings("ignore:Using a target size")  # l1_loss of (N, 1) outputs and (N,) targets: fine here
def test_a_dry_run_shows_code_outside_the_recipe_directory_by_its_absolute_path_and_installed_code_unbound(
        finished: Path, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "bound_model.py").rename(elsewhere / "bound_model.py")
    monkeypatch.syspath_prepend(str(elsewhere))
    result = esper("train", project / "recipe.yaml", "--dry-run", "task.kind=custom",
                   "task.function=torch.nn.functional:l1_loss")
    assert result.exit_code == 0, result.output
    moved = elsewhere / "bound_model.py"
    assert f"  bound_model (model.factory): {moved}, sha256 {_digest(moved)}" in result.stdout, result.stdout
    assert ("  torch.nn.functional (task.function): not bound (a module of the standard library or of an "
            "installed package, versioned by its package, or one without a source file)") in result.stdout


def test_a_dry_run_of_a_recipe_naming_no_code_says_so(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    result = esper("train", recipe, "--dry-run", f"run.output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "code the run binds: none (the recipe names no data.factory, model.factory or task.function)" \
        in result.stdout, result.stdout
    as_json = esper("train", recipe, "--dry-run", "--json", f"run.output_dir={tmp_path}")
    assert json.loads(as_json.stdout)["code"] == {}


def _report(run: Path, out: Path) -> tuple[int, dict[str, str]]:
    """``esper report RUN --out OUT``: its exit code and the three files it wrote."""
    result = esper_report(run, "--out", out)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, {f: (out / f"report.{f}").read_text(encoding="utf-8") for f in ("md", "html", "json")}


def test_the_report_lists_the_code_and_that_each_file_matches(finished: Path, project: Path, tmp_path: Path) -> None:
    code, files = _report(finished, tmp_path / "report")
    assert code == 0
    recorded = json.loads(files["json"])["code"]
    assert recorded["recorded_in"] == "final/manifest.json" and recorded["bound"] is True
    assert [(m["module"], m["field"], m["file"], m["path"], m["sha256"], m["state"], m["detail"])
            for m in recorded["modules"]] == [
        (name, field, str(project / f"{name}.py"), f"{name}.py", _digest(project / f"{name}.py"), "matches", "matches")
        for name, field in (("bound_data", "data.factory"), ("bound_model", "model.factory"))]
    detail = recorded["detail"]
    assert recorded["recipe_dir"] == str(project)
    assert detail.startswith(f"2 modules recorded in final/manifest.json, which run_end binds; paths relative "
                             f"to the recipe's directory, {project}: bound_data.py matches, bound_model.py "
                             "matches"), detail
    assert "not checked: the modules they import" in detail, detail
    for text in (files["md"], files["html"]):
        assert "## Factory code" in text or "<h2>Factory code</h2>" in text
        assert _digest(project / "bound_model.py") in text and detail in text.replace("&#x27;", "'")
    assert "| factory code | 2 modules recorded" in files["md"]


def test_the_report_states_an_edited_or_missing_module_as_a_finding_not_a_failure(
        finished: Path, project: Path, tmp_path: Path) -> None:
    recorded = _digest(project / "bound_model.py")
    (project / "bound_model.py").write_text(MODEL.replace("nn.ReLU()", "nn.Tanh()"))
    (project / "bound_data.py").unlink()
    code, files = _report(finished, tmp_path / "report")
    assert code == 0  # the run's own files are intact: the code beside its recipe changed since
    assert "audit passed" in files["md"].splitlines()[0]
    modules = {m["module"]: m for m in json.loads(files["json"])["code"]["modules"]}
    now = _digest(project / "bound_model.py")
    assert modules["bound_model"]["sha256"] == recorded and modules["bound_model"]["state"] == "differs"
    assert modules["bound_model"]["detail"] == f"differs (sha256 {now[:12]}… now)"
    assert modules["bound_data"]["state"] == "not found"
    assert modules["bound_data"]["detail"] == f"not found at {project / 'bound_data.py'}"
    for text in (files["md"], files["html"]):
        assert f"bound_model.py differs (sha256 {now[:12]}… now)" in text
        assert f"bound_data.py not found at {project / 'bound_data.py'}" in text
    assert "**factory code: 2 modules recorded" in files["md"]  # a status line under the title, in bold


def test_the_report_of_an_unfinished_run_reads_the_code_from_its_latest_checkpoint(
        finished: Path, project: Path, tmp_path: Path) -> None:
    copy = copy_at(finished, tmp_path, 3)
    shutil.rmtree(copy / "final")
    _, files = _report(copy, tmp_path / "report")
    recorded = json.loads(files["json"])["code"]
    where = f"checkpoints/{store.checkpoint_name(3)}/state.json"
    assert recorded["recorded_in"] == where and recorded["bound"] is False
    assert recorded["detail"].startswith(f"2 modules recorded in {where}, the latest checkpoint (not bound to the "
                                         f"event chain); paths relative to the recipe's directory, {project}: "
                                         "bound_data.py matches"), recorded["detail"]


def test_the_report_of_a_run_recorded_before_its_code_was_says_not_checked(finished: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(finished, tmp_path / "old"))
    manifest = json.loads((copy / "final/manifest.json").read_text())
    del manifest["recipe_code"]
    (copy / "final/manifest.json").write_text(json.dumps(manifest))
    _, files = _report(copy, tmp_path / "report")  # the edit also fails the run_end binding: exit 4
    recorded = json.loads(files["json"])["code"]
    assert recorded["modules"] == [] and recorded["detail"] == (
        "not checked: final/manifest.json records no factory code (the run predates that record)")
    assert "| factory code | not checked: final/manifest.json records no factory code" in files["md"]
