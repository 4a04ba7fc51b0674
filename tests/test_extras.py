"""Optional extras: pyproject.toml and esper_core.extras agree, fast-moving dependencies are capped, and a
tier whose client is missing stops with one located line naming the extra (the wheel test checks the
same from a real install without the extras)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from esper_core.errors import RECIPE_FIELD, ConfigError
from esper_core.extras import EXTRAS, MissingExtra, install_hint, require_extra
from esper_core.recipe.schema import StorageConfig
from esper_core.storage.settings import StorageSettings

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CAPPED = ("typer", "rich", "pydantic", "numpy", "safetensors", "sqlalchemy", "alembic", "prometheus-client", "pyyaml",
          "torch")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower()


def test_every_extra_is_declared_and_the_test_extra_has_them_all() -> None:
    optional = PROJECT["optional-dependencies"]
    assert set(EXTRAS) | {"test"} == set(optional)
    (self_reference,) = [r for r in optional["test"] if r.startswith(PROJECT["name"])]
    assert set(re.search(r"\[(.*)\]", self_reference).group(1).split(",")) == set(EXTRAS)  # type: ignore[union-attr]
    assert PROJECT["name"] == "esper-morph"


def test_the_base_requirements_hold_no_optional_client_and_cap_fast_movers() -> None:
    base = {_name(r): r for r in PROJECT["dependencies"]}
    assert not set(base) & {"redis", "psycopg", "boto3", "scikit-learn", "scipy", "onnx", "tensorboard"}
    for name in CAPPED:
        assert "<" in base[name], f"{name} has no upper bound: {base[name]}"
    assert re.search(r"typer>=[\d.]+,<0\.\d+$", base["typer"])  # 0.x: capped at the next minor


def test_a_missing_extra_is_one_located_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRAS, "redis", ("esper_module_that_is_not_installed",))
    with pytest.raises(MissingExtra) as excinfo:
        require_extra("redis", "redis:// URLs", source="ESPER_REDIS_URL")
    (problem,) = excinfo.value.problems
    assert excinfo.value.exit_code == 2 and "\n" not in str(problem)
    assert str(problem) == ("ESPER_REDIS_URL: redis:// URLs need the optional package "
                            "esper_module_that_is_not_installed: pip install 'esper-morph[redis]'")
    with pytest.raises(ConfigError) as from_recipe:
        StorageSettings.resolve(StorageConfig(redis_url="redis://127.0.0.1:6379/0"), env={})
    (problem,) = from_recipe.value.problems
    assert (problem.source, problem.field) == (RECIPE_FIELD, "storage.redis_url")
    assert install_hint("redis") in problem.message


def test_postgres_urls_need_the_postgres_extra_and_sqlite_needs_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRAS, "postgres", ("esper_module_that_is_not_installed",))
    env = {"ESPER_DATABASE_URL": "postgresql://u@127.0.0.1/db"}
    with pytest.raises(MissingExtra, match=r"ESPER_DATABASE_URL: postgresql:// URLs need .*esper-morph\[postgres\]"):
        StorageSettings.resolve(StorageConfig(), env=env)
    StorageSettings.resolve(StorageConfig(database_url="sqlite:////tmp/x.db"), env={})  # the default tier: no extra


def test_installed_extras_pass() -> None:
    for extra in ("redis", "postgres"):  # installed by [test]
        require_extra(extra, "this", source="test")
