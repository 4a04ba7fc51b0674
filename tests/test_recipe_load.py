"""Loading valid recipes: defaults, overrides, the resolved record and its hash, paths, the reference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from esper_core.recipe import LoadedRecipe, Recipe, load_recipe, resolve_relative
from esper_core.recipe import reference
from esper_core.recipe.yaml_source import parse_yaml


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file_gives_all_defaults(tmp_path: Path, text: str) -> None:
    loaded = load_recipe(_write(tmp_path, text))
    assert loaded.recipe == Recipe()
    assert loaded.path == (tmp_path / "recipe.yaml").resolve()


def test_values_from_the_file_are_used(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, "run:\n  name: demo\ntrainer:\n  max_steps: 300\n  lr: 0.01\n"))
    assert loaded.recipe.run.name == "demo"
    assert (loaded.recipe.trainer.max_steps, loaded.recipe.trainer.lr) == (300, 0.01)
    assert loaded.recipe.trainer.optimizer == "adamw"  # untouched keys keep their defaults


def test_overrides_are_applied(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainer:\n  max_steps: 1000\n")
    loaded = load_recipe(path, ["trainer.max_steps=200", "seeds.per_layer=2"])
    assert loaded.recipe.trainer.max_steps == 200
    assert loaded.recipe.seeds.per_layer == 2


def test_override_values_are_yaml_and_later_ones_win(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, ""), [
        "seeds.targets=[features.*, 're:head']", "run.deterministic=false", "trainer.grad_clip=",
        "trainer.lr=0.5", "trainer.lr=0.25", "policy={growth_window: [0.1, 0.9]}",
    ])
    assert loaded.recipe.seeds.targets == ["features.*", "re:head"]
    assert loaded.recipe.run.deterministic is False
    assert loaded.recipe.trainer.grad_clip is None
    assert loaded.recipe.trainer.lr == 0.25
    assert loaded.recipe.policy.growth_window == (0.1, 0.9)


def test_override_creates_keys_and_fills_an_empty_section(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, "trainer:\n"), ["trainer.lr=0.1", "data.synthetic.n_classes=5"])
    assert loaded.recipe.trainer.lr == 0.1
    assert loaded.recipe.data.synthetic.n_classes == 5


def test_override_does_not_leak_through_a_shared_anchor(tmp_path: Path) -> None:
    text = "data:\n  factory_kwargs: &kw {depth: 1}\nmodel:\n  factory_kwargs: *kw\n"
    loaded = load_recipe(_write(tmp_path, text), ["data.factory_kwargs.depth=2"])
    assert loaded.recipe.data.factory_kwargs == {"depth": 2}
    assert loaded.recipe.model.factory_kwargs == {"depth": 1}


def test_merge_keys_are_supported(tmp_path: Path) -> None:
    text = "data:\n  factory_kwargs: &base {a: 1, b: 2}\nmodel:\n  factory_kwargs:\n    <<: *base\n    b: 3\n"
    loaded = load_recipe(_write(tmp_path, text))
    assert loaded.recipe.model.factory_kwargs == {"a": 1, "b": 3}


def test_resolved_yaml_round_trips_to_the_same_recipe(tmp_path: Path) -> None:
    text = ("run:\n  name: demo\nmodel:\n  widths: [32, 16]\n  factory_kwargs: {when: 2024-01-02, tags: [x]}\n"
            "policy:\n  growth_window: [0.1, 0.6]\n")
    loaded = load_recipe(_write(tmp_path, text), ["trainer.max_steps=200"])
    assert Recipe.model_validate(yaml.safe_load(loaded.resolved_yaml)) == loaded.recipe
    again = load_recipe(_write(tmp_path, loaded.resolved_yaml, "resolved.yaml"))
    assert again.recipe == loaded.recipe
    assert again.resolved_yaml == loaded.resolved_yaml
    assert again.sha256 == loaded.sha256


def test_resolved_yaml_holds_every_default_in_schema_order(tmp_path: Path) -> None:
    resolved = yaml.safe_load(load_recipe(_write(tmp_path, "")).resolved_yaml)
    assert list(resolved) == list(Recipe.model_fields)
    assert resolved["trainer"] == Recipe().trainer.model_dump()


def test_sha256_is_the_digest_of_the_resolved_yaml_and_is_stable(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainer:\n  max_steps: 50\n")
    first, second = load_recipe(path), load_recipe(path)
    assert first.sha256 == second.sha256 == hashlib.sha256(first.resolved_yaml.encode()).hexdigest()
    spelled_out = load_recipe(_write(tmp_path, "trainer:\n  max_steps: 50\n  lr: 0.001\n", "explicit.yaml"))
    assert spelled_out.sha256 == first.sha256  # same resolved recipe, same hash, however it was written
    assert load_recipe(path, ["trainer.max_steps=51"]).sha256 != first.sha256


def test_loaded_recipe_is_frozen(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, ""))
    with pytest.raises(AttributeError):
        loaded.sha256 = "x"  # type: ignore[misc]
    assert isinstance(loaded, LoadedRecipe)


def test_data_file_is_found_relative_to_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "xy.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    recipe = _write(tmp_path, "data:\n  source: file\n  path: data/xy.npz\nseeds:\n  blueprint_dirs: [bp]\n")
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    loaded = load_recipe(recipe)
    assert loaded.recipe.data.path == "data/xy.npz"  # stays as written
    assert resolve_relative(loaded, loaded.recipe.data.path) == tmp_path.resolve() / "data" / "xy.npz"
    assert resolve_relative(loaded, loaded.recipe.seeds.blueprint_dirs[0]) == tmp_path.resolve() / "bp"
    assert resolve_relative(loaded, "/abs/file.csv") == Path("/abs/file.csv")


def test_line_map_locates_values_keys_and_list_items() -> None:
    text = "seeds:\n  targets:\n    - a\n    - b\ntrainer:\n  lr:\n    0.1\n  nested: {x: 1}\n"
    lines = parse_yaml(text, "<test>").lines
    assert lines == {"": 1, "seeds": 1, "seeds.targets": 2, "seeds.targets.0": 3, "seeds.targets.1": 4,
                     "trainer": 5, "trainer.lr": 7, "trainer.nested": 8, "trainer.nested.x": 8}


def test_reference_doc_is_up_to_date() -> None:
    assert reference.main(["--check"]) == 0, "run: python -m esper_core.recipe.reference"


def test_reference_check_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "reference.md"
    assert reference.main(["--check", "--output", str(stale)]) == 1  # missing counts as stale
    assert reference.main(["--output", str(stale)]) == 0
    assert reference.main(["--check", "--output", str(stale)]) == 0
    stale.write_text(stale.read_text() + "edited by hand\n")
    assert reference.main(["--check", "--output", str(stale)]) == 1


def _fields(model: type[BaseModel], path: str = ""):
    for name, info in model.model_fields.items():
        yield f"{path}{name}", info
        section = reference.section_model(info.annotation)
        if section is not None:
            yield from _fields(section, f"{path}{name}.")


def test_every_section_has_its_own_table_optional_ones_too() -> None:
    """`trainer.early_stopping` (a section that is null by default) once had no table: its keys
    (`patience`, `min_delta`, `during_growth`) were documented nowhere in the reference."""
    text = reference.render_reference()
    sections = {dotted: reference.section_model(info.annotation) for dotted, info in _fields(Recipe)}
    assert sections["trainer.early_stopping"] is not None
    for dotted, model in sections.items():
        if model is None or "." not in dotted:
            continue
        table = text.split(f"## `{dotted}`\n", 1)[1].split("\n## ", 1)[0]
        for key in model.model_fields:
            assert f"| `{key}` |" in table, f"{dotted}.{key} is missing from its table"


def test_every_recipe_key_is_documented() -> None:
    text = reference.render_reference()
    for dotted, info in _fields(Recipe):
        assert info.description, f"{dotted} has no description"
        assert f"`{dotted.rsplit('.', 1)[-1]}`" in text
