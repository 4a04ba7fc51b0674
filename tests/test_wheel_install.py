"""The package as a user gets it: a wheel, installed into a fresh virtual environment with only the
base requirements, runs the quickstart; and each optional tier whose extra is missing stops with one
line that names the extra to install.

Speed and offline safety: installing PyTorch again would take most of a minute on a two-core
machine, so the fresh environment sees this environment's own ``torch==2.13.0`` (and the packages
torch itself requires) through a ``.pth`` file pointing at a directory of links to exactly those
distributions, nothing else. pip counts torch as installed and installs every other base requirement
from the wheel's metadata (from pip's cache or the package index, as for a user). The extras
(redis, psycopg, boto3, ...) are therefore absent, and the test checks that they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
EXTRA_MODULES = ("redis", "psycopg", "boto3", "sklearn", "scipy", "lightning", "tensorboard", "mlflow", "onnx",
                 "transformers")

pytestmark = pytest.mark.wheel


def _closure(name: str) -> list[metadata.Distribution]:
    """``name`` and every distribution it requires here (markers evaluated, extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


def _torch_only_site(target: Path) -> Path:
    """A directory of links to the installed torch and its own requirements (files and dist-info)."""
    target.mkdir()
    for dist in _closure("torch"):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (target / top).exists() and top != "__pycache__":
                (target / top).symlink_to(source)
    return target


def _run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="120")
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = Path(shutil.copytree(REPO, root / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", ".esper", "__pycache__", "*.egg-info", ".hypothesis")))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  root / "dist", source], root, env)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("esper_morph-*.whl"))
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root,
                     env).stdout.strip())
    (site / "torch-2.13.0-only.pth").write_text(str(_torch_only_site(root / "torch-only")) + "\n", encoding="utf-8")
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", wheel], root, env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return {"root": root, "wheel": wheel, "python": python, "esper": python.parent / "esper", "env": env}


def test_the_wheel_carries_the_data_the_package_reads(installed: dict[str, object]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())  # type: ignore[arg-type]
    for name in ("esper_core/datasets/data/digits.csv.gz", "esper_core/datasets/data/breast_cancer.csv.gz",
                 "esper_core/datasets/data/wine.csv.gz", "esper_core/datasets/data/NOTICE.md",
                 "esper_core/blueprints/library/lowrank_adapter.yaml",
                 "esper_core/storage/migrations/versions/0001_initial.py"):
        assert name in names, name
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(installed["wheel"]).read(meta).decode()  # type: ignore[arg-type]
    required = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in required if re.search(r"redis|psycopg|scikit|boto3|lightning|onnx", line)]


def test_only_the_base_requirements_are_installed(installed: dict[str, object]) -> None:
    code = ("import importlib.util, json, esper_core; print(json.dumps({'file': esper_core.__file__, 'missing': ["
            f"m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m) is None]}}))")
    done = _run([installed["python"], "-c", code], installed["root"], installed["env"])  # type: ignore[list-item]
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert "site-packages" in found["file"] and str(REPO) not in found["file"]
    assert found["missing"] == list(EXTRA_MODULES)
    version = _run([installed["esper"], "--version"], installed["root"], installed["env"])  # type: ignore[list-item]
    assert version.stdout.strip() == f"esper-morph {metadata.version('esper-morph')}"


def test_the_quickstart_trains_from_the_installed_wheel(installed: dict[str, object]) -> None:
    done = _run([installed["esper"], "train", QUICKSTART, "trainer.max_steps=20", "run.output_dir=runs",  # type: ignore[list-item]
                 "storage.workspace=ws"], installed["root"], installed["env"])  # type: ignore[arg-type]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((installed["root"] / "runs" / "quickstart" / "summary.json").read_text())  # type: ignore[operator]
    assert summary["steps"] == 20 and 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("args,env,extra", [
    (["train", QUICKSTART, "run.output_dir=never", "storage.redis_url=redis://127.0.0.1:6379/0"], {}, "redis"),
    (["train", QUICKSTART, "run.output_dir=never", "storage.database_url=postgresql://u@127.0.0.1/db"], {},
     "postgres"),
    (["train", QUICKSTART, "run.output_dir=never", "storage.artifacts_url=s3://bucket/runs"], {}, "s3"),
    (["inspect-cache", "--workspace", "ws"], {"ESPER_REDIS_URL": "redis://127.0.0.1:6379/0"}, "redis"),
    (["inspect-cache", "--workspace", "ws"], {"ESPER_DATABASE_URL": "postgresql://u@127.0.0.1/db"}, "postgres"),
])
def test_a_missing_extra_is_one_line_naming_it(installed: dict[str, object], args: list[str | Path],
                                               env: dict[str, str], extra: str) -> None:
    done = _run([installed["esper"], *args], installed["root"], {**installed["env"], **env})  # type: ignore[list-item,dict-item]
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'esper-morph[{extra}]'" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (installed["root"] / "never").exists()  # type: ignore[operator]
