"""Recipe inputs that used to crash or silently mean something else (issue 11, items 16 and 17):
strict types, integers too long to parse, a synthetic dataset too large to generate, an output
directory that is a file, `run.device: cuda` without a GPU, factories when they are not allowed, and
a file the user names that is not a regular file (a FIFO blocked `esper train` forever).
Each is one located problem and exit 2, through `esper train` where the check runs before training.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from esper_core.errors import ConfigError
from esper_core.recipe import check_device, check_output_dir, load_recipe
from esper_core.recipe.overrides import COMMAND_LINE


def recipe(tmp_path: Path, text: str = "trainer: {max_steps: 5}\n") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def problems(path: Path, *overrides: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, **kwargs)
    assert info.value.exit_code == 2
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("override, field", [
    ("trainer.max_steps=true", "trainer.max_steps"), ("trainer.max_steps='200'", "trainer.max_steps"),
    ("trainer.lr='0.1'", "trainer.lr"), ("run.deterministic=1", "run.deterministic"),
    ("run.deterministic='true'", "run.deterministic"), ("run.seed=1.0", "run.seed"),
    ("policy.growth_window=['0.1', 0.5]", "policy.growth_window.0"), ("trainer.lr=true", "trainer.lr")])
def test_types_are_strict(tmp_path: Path, override: str, field: str) -> None:
    (found,) = problems(recipe(tmp_path), override)
    assert found.startswith(f"{COMMAND_LINE}: {field}: override {override!r}: "), found


def test_an_integer_where_a_float_is_expected_is_still_a_float(tmp_path: Path) -> None:
    loaded = load_recipe(recipe(tmp_path), ["trainer.lr=1", "policy.growth_window=[0, 1]"])
    assert loaded.recipe.trainer.lr == 1.0 and isinstance(loaded.recipe.trainer.lr, float)
    assert loaded.recipe.policy.growth_window == (0.0, 1.0)


def test_a_five_thousand_digit_integer_is_located(tmp_path: Path) -> None:
    path = recipe(tmp_path, "run: {name: big}\ntrainer:\n  max_steps: " + "9" * 5000 + "\n")
    assert problems(path) == [f"{path}:3: trainer.max_steps: an integer of 5000 characters is too large (at most 40)"]
    (found,) = problems(recipe(tmp_path), "trainer.max_steps=" + "1" * 5000)
    assert "too large" in found and "trainer.max_steps" in found


def test_a_synthetic_dataset_too_large_to_generate_is_refused(tmp_path: Path) -> None:
    path = recipe(tmp_path, "data:\n  source: synthetic\n  synthetic: {n_samples: 10000000, n_features: 100000}\n")
    (found,) = problems(path)
    assert found.startswith(f"{path}:3: data.synthetic: n_samples x n_features is 1,000,000,000,000 values")
    assert load_recipe(path, ["data.synthetic.n_features=10"]).recipe.data.synthetic.n_features == 10


def test_an_output_dir_that_is_a_file_is_located(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a directory")
    path = recipe(tmp_path, f"run:\n  name: x\n  output_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(ConfigError) as info:
        check_output_dir(load_recipe(path))
    assert str(info.value) == (f"{path}:3: run.output_dir: {str(tmp_path / 'runs')!r} is not a directory: "
                               f"{tmp_path / 'runs'} is a file; name a directory for run directories")
    with pytest.raises(ConfigError, match="is in its path"):
        check_output_dir(load_recipe(path, [f"run.output_dir={tmp_path / 'runs' / 'deeper'}"]))
    check_output_dir(load_recipe(path, [f"run.output_dir={tmp_path / 'new' / 'runs'}"]))  # creatable: fine


def test_a_dangling_link_where_the_run_directory_goes_is_named(tmp_path: Path) -> None:
    """A symbolic link to nothing at ``runs/NAME`` (or at the ``NAME-2`` taken next) was "cannot create
    the run directory ...: File exists": the link was invisible to ``exists()``, and nothing said what
    stood there or what to do. The dry run's check and the creation both name it."""
    from esper_core.training.recording import fresh_run_dir

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "x").symlink_to(tmp_path / "gone")
    path = recipe(tmp_path, f"run:\n  name: x\n  output_dir: {runs}\n")
    says = (f"{runs / 'x'} is a symbolic link to {tmp_path / 'gone'}, which does not exist: remove the link, "
            "or choose another run.output_dir or run.name")
    with pytest.raises(ConfigError) as info:
        check_output_dir(load_recipe(path))
    assert str(info.value) == f"{path}:3: run.output_dir: {says}"
    with pytest.raises(ConfigError) as info:
        fresh_run_dir(runs / "x")
    assert info.value.problems[0].message == f"cannot create the run directory: {says}"
    (runs / "x").unlink()
    (runs / "x").mkdir()  # an earlier run: the next name is taken, and a link stands there
    (runs / "x-2").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="x-2 is a symbolic link to"):
        fresh_run_dir(runs / "x")


def test_cuda_without_a_gpu_is_a_located_config_error(tmp_path: Path) -> None:
    path = recipe(tmp_path, "run:\n  device: cuda\n")
    with pytest.raises(ConfigError) as info:
        check_device(load_recipe(path), cuda_available=False)
    assert info.value.exit_code == 2 and str(info.value).startswith(f"{path}:2: run.device: is 'cuda' but no CUDA")
    check_device(load_recipe(path), cuda_available=True)
    check_device(load_recipe(path, ["run.device=auto"]), cuda_available=False)


FACTORY_RECIPE = """\
data: {source: factory, factory: "os:system", factory_kwargs: {command: "touch PWNED"}}
model: {arch: factory, factory: "my_models:build"}
"""


def test_factories_are_refused_when_not_allowed_naming_every_field(tmp_path: Path, monkeypatch) -> None:
    path = recipe(tmp_path, FACTORY_RECIPE)
    found = problems(path, allow_factories=False)
    assert [f.split(": ")[1] for f in found] == ["data.factory", "model.factory"]
    assert found[0].startswith(f"{path}:1: data.factory: names user code ('os:system')")
    monkeypatch.setenv("ESPER_ALLOW_FACTORIES", "0")
    assert len(problems(path)) == 2
    (by_override,) = problems(recipe(tmp_path), "model.factory=pkg.mod:fn")
    assert by_override.startswith(f"{COMMAND_LINE}: model.factory: override 'model.factory=pkg.mod:fn'")
    monkeypatch.setenv("ESPER_ALLOW_FACTORIES", "1")
    load_recipe(path)  # allowed: loading never imports the factory (the trainer does)
    monkeypatch.setenv("ESPER_ALLOW_FACTORIES", "maybe")
    assert problems(path) == ["ESPER_ALLOW_FACTORIES: must be 1 or 0 (got 'maybe')"]


def test_esper_train_refuses_a_factory_recipe_before_running_it(tmp_path: Path) -> None:
    path = recipe(tmp_path, FACTORY_RECIPE)
    result = subprocess.run([sys.executable, "-m", "esper_cli", "train", str(path), f"run.output_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**__import__("os").environ, "ESPER_ALLOW_FACTORIES": "0"})
    assert result.returncode == 2, result.stderr
    assert "data.factory: names user code" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "PWNED").exists()


LM_RECIPE = """\
run: {name: lm, seed: 0, device: cpu}
task: {kind: language_model}
data: {source: text, path: DATA, text: {seq_len: 32}, batch_size: 16}
model: {arch: transformer, d_model: 32, n_layers: 1, n_heads: 2}
seeds: {targets: ["blocks.*.mlp.*"], blueprints: [wide_mlp]}
trainer: {max_steps: 5}
telemetry: {progress: none}
"""


@pytest.mark.parametrize("overrides, says", [
    (["task.kind=classification"], "RuntimeError: Expected target size"),
    (["task.kind=regression"], "is invalid for input of size"),
    (["model={arch: mlp, widths: [16]}", "seeds.targets=[layers.0]"], "must have the same dtype"),
], ids=["classification-on-tokens", "regression-on-tokens", "mlp-on-token-ids"])
def test_a_model_task_and_data_that_do_not_fit_are_a_recipe_error(tmp_path: Path, overrides: list[str],
                                                                  says: str) -> None:
    """They were tracebacks at the first step (exit 1, a half-made run directory left behind), and
    --dry-run passed them with exit 0."""
    path = tmp_path / "lm.yaml"
    data = Path(__file__).resolve().parents[1] / "recipes" / "data" / "design-notes.txt"
    path.write_text(LM_RECIPE.replace("DATA", str(data)), encoding="utf-8")
    for mode in (["--dry-run"], [f"run.output_dir={tmp_path / 'runs'}"]):
        done = subprocess.run([sys.executable, "-m", "esper_cli", "train", str(path), *mode, *overrides],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "task.kind: " in lines[0] and "do not fit together" in lines[0] and says in lines[0]
    assert not (tmp_path / "runs").exists()


REPO = Path(__file__).resolve().parents[1]
Case = tuple[list[str], str]
"""The command's arguments and the one error line it must print (without ``error: ``)."""


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def _socket(path: Path) -> str:
    """A Unix socket file, bound by its name in the current directory (socket paths must be short)."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path.name)
    return str(path)


def _recipe_fifo(d: Path) -> Case:
    return ["train", _fifo(d / "f.yaml")], f"{d / 'f.yaml'}: is a FIFO, not a YAML file"


def _dry_run_fifo(d: Path) -> Case:
    return ["train", _fifo(d / "f.yaml"), "--dry-run"], f"{d / 'f.yaml'}: is a FIFO, not a YAML file"


def _recipe_socket(d: Path) -> Case:
    return ["train", _socket(d / "s.yaml")], f"{d / 's.yaml'}: is a socket, not a YAML file"


def _dev_null(d: Path) -> Case:
    return ["train", "/dev/null"], "/dev/null: is a character device, not a YAML file"


def _stdin_pipe(d: Path) -> Case:
    return ["train", "/dev/stdin"], "/dev/stdin: is a FIFO, not a YAML file"  # stdin is the test's pipe


def _compile_for_fifo(d: Path) -> Case:
    blueprint = REPO / "tests" / "blueprints" / "linear_conv.yaml"
    return (["compile", str(blueprint), "--check", "--for", _fifo(d / "f.yaml")],
            f"{d / 'f.yaml'}: is a FIFO, not a YAML file")


def _blueprint_fifo(d: Path) -> Case:
    return (["compile", _fifo(d / "bp.yaml"), "--check", "--linear", "8:8"],
            f"{d / 'bp.yaml'}: is a FIFO, not a YAML file")


def _blueprint_dir_fifo(d: Path) -> Case:
    (d / "bps").mkdir()
    _fifo(d / "bps" / "x.yaml")
    (d / "r.yaml").write_text("run: {name: b, device: cpu}\nseeds: {blueprint_dirs: [bps]}\n")
    return ["train", str(d / "r.yaml"), "--dry-run"], f"{d / 'bps' / 'x.yaml'}: is a FIFO, not a YAML file"


def _data_file_fifo(d: Path) -> Case:
    _fifo(d / "d.npz")
    (d / "r.yaml").write_text("trainer: {max_steps: 2}\n")
    return (["train", str(d / "r.yaml"), "data.source=file", "data.path=d.npz", "--dry-run"],
            f"{COMMAND_LINE}: data.path: override 'data.path=d.npz': data file is not a regular file (it is a FIFO): "
            f"{d / 'd.npz'}")


def _text_file_fifo(d: Path) -> Case:
    _fifo(d / "t.txt")
    (d / "r.yaml").write_text(LM_RECIPE.replace("DATA", "t.txt"))
    return ["train", str(d / "r.yaml"), "--dry-run"], f"{d / 't.txt'}: is not a regular file (it is a FIFO)"


NOT_A_FILE = {"recipe": _recipe_fifo, "dry-run": _dry_run_fifo, "socket": _recipe_socket, "dev-null": _dev_null,
              "stdin-pipe": _stdin_pipe, "compile-for": _compile_for_fifo, "blueprint": _blueprint_fifo,
              "blueprint-dir": _blueprint_dir_fifo, "data-file": _data_file_fifo, "text-file": _text_file_fifo}


@pytest.mark.parametrize("case", NOT_A_FILE)
def test_a_named_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     case: str) -> None:
    """A FIFO named as a recipe, a blueprint, a blueprint directory's file or a data file blocked the command
    forever (``open`` waits for a writer), ``/dev/null`` trained a recipe of defaults, and ``/dev/stdin`` fed
    by a pipe was "file not found". Each is refused before it is read: one line naming the file, exit 2,
    as a directory there already was. The timeout turns a hang back into a failure."""
    monkeypatch.chdir(tmp_path)
    args, says = NOT_A_FILE[case](tmp_path)
    output = [f"run.output_dir={tmp_path / 'runs'}"] if args[0] == "train" else []
    done = subprocess.run([sys.executable, "-m", "esper_cli", *args, *output], input="trainer: {max_steps: 2}\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {says}"], done.stderr
    assert not (tmp_path / "runs").exists()
