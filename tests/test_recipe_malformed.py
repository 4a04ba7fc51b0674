"""Every way a recipe or an override can be wrong gives exactly the promised one-line messages.

Each case is a recipe text (written to ``tmp_path/recipe.yaml``) plus optional overrides and extra
files; ``{f}`` in an expected line is the recipe path as passed to the loader, ``{d}`` its directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from esper_core.errors import ConfigError
from esper_core.recipe import load_recipe
from esper_core.recipe.yaml_source import MAX_FILE_BYTES

TRAINER_KEYS = ("max_steps, optimizer, lr, weight_decay, momentum, schedule, warmup_steps, step_size, gamma, "
                "accumulate_steps, grad_clip, precision, compile, eval_every, log_every, governor, early_stopping")
SECTIONS = "run, task, data, model, seeds, policy, trainer, checkpoint, telemetry, storage, distributed"
FACTORY_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def _alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": nine levels of nine aliases each, 9**9 values once expanded."""
    lines = ["data:", "  factory_kwargs:", '    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghij"
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"    {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    expected: list[str]
    overrides: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("unknown top-level key", "trainerr:\n  max_steps: 5\n",
         [f"{{f}}:1: trainerr: unknown key, did you mean 'trainer'? (allowed: {SECTIONS})"]),
    Case("unknown nested key", "trainer:\n  lr: 0.1\n  epochs: 3\n",
         [f"{{f}}:3: trainer.epochs: unknown key (allowed: {TRAINER_KEYS})"]),
    Case("string for int", "trainer:\n  max_steps: ten\n",
         ["{f}:2: trainer.max_steps: must be an integer (got 'ten', a string)"]),
    Case("number YAML reads as text", "run:\n  seed: 1e3\n",
         ["{f}:2: run.seed: must be an integer (got '1e3', a string: if it is meant as a number, write it without "
          "quotes and in plain digits (YAML reads forms such as 1e3 as text))"]),
    Case("bad enum value", "run:\n  name: demo\n  device: tpu\n",
         ["{f}:3: run.device: must be one of 'auto', 'cpu', 'cuda' (got 'tpu')"]),
    Case("negative batch size", "data:\n  batch_size: -1\n",
         ["{f}:2: data.batch_size: Input should be greater than or equal to 1 (got -1)"]),
    Case("zero max_steps", "trainer:\n  max_steps: 0\n",
         ["{f}:2: trainer.max_steps: Input should be greater than or equal to 1 (got 0)"]),
    Case("fraction out of range", "data:\n  val_fraction: 0.7\n",
         ["{f}:2: data.val_fraction: Input should be less than 0.5 (got 0.7)"]),
    Case("growth window out of order", "policy:\n  trigger: periodic\n  growth_window: [0.8, 0.2]\n",
         ["{f}:3: policy.growth_window: must satisfy 0 <= start < end <= 1 (got [0.8, 0.2])"]),
    Case("a warm-up as long as the run", "trainer:\n  max_steps: 3000\n  warmup_steps: 5000\n",
         ["{f}:1: trainer: `warmup_steps` (5000) must be below `max_steps` (3000): the learning rate would never "
          "reach `lr`"]),
    Case("a blueprint named twice", "seeds:\n  blueprints: [wide_mlp, lowrank_adapter, wide_mlp]\n",
         ["{f}:2: seeds.blueprints: 'wide_mlp' listed more than once; name each blueprint once"]),
    Case("growth window too short", "policy:\n  growth_window:\n    - 0.5\n",
         ["{f}:2: policy.growth_window.1: Field required"]),
    Case("missing data file", "data:\n  source: file\n  path: nope.npz\n",
         ["{f}:3: data.path: data file not found: {d}/nope.npz"]),
    Case("wrong data file suffix", "data:\n  source: file\n  path: samples.txt\n",
         ["{f}:3: data.path: data file must end in .npz or .csv (got 'samples.txt')"],
         files={"samples.txt": "1,2\n"}),
    Case("file source without path", "run:\n  seed: 1\ndata:\n  source: file\n",
         ["{f}:3: data: `path` is required when source is 'file'"]),
    Case("factory with bad pattern", "data:\n  source: factory\n  factory: not a function\n",
         [f"{{f}}:3: data.factory: String should match pattern '{FACTORY_PATTERN}' (got 'not a function')"]),
    Case("section is a scalar", "trainer: 5\n", ["{f}:1: trainer: must be a mapping of keys (got 5)"]),
    Case("YAML syntax error", "trainer:\n  max_steps: 5\n   lr: 0.1\n",
         ["{f}:3: invalid YAML: mapping values are not allowed here"]),
    Case("unclosed flow list", "model:\n  widths: [32, 16\nrun: {}\n",
         ["{f}:3: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence started on line 2)"]),
    Case("unsafe python tag", "run: !!python/object/apply:os.system ['echo hi']\n",
         ["{f}:1: invalid YAML: could not determine a constructor for the tag "
          "'tag:yaml.org,2002:python/object/apply:os.system'"]),
    Case("alias bomb", _alias_bomb(),
         ["{f}:8: data.factory_kwargs.f: more than 100000 values once aliases are expanded (an alias bomb?)"]),
    Case("recursive alias", "data:\n  factory_kwargs: &k\n    self: *k\n",
         ["{f}:2: data.factory_kwargs.self: an alias refers to a node that contains it"]),
    Case("duplicate key", "trainer:\n  lr: 0.1\n  max_steps: 10\n  lr: 0.2\n",
         ["{f}:4: trainer.lr: duplicate key (first defined on line 2)"]),
    Case("keys YAML reads as non-strings", "data:\n  factory_kwargs:\n    on: 1\n    2: two\n",
         ["{f}:3: data.factory_kwargs.on: key 'on' is read as bool, not a string; quote it",
          "{f}:4: data.factory_kwargs.2: key '2' is read as int, not a string; quote it"]),
    Case("top level is a list", "# sections\n- run\n- trainer\n",
         ["{f}:2: the top level must be a mapping of sections, not a list"]),
    Case("two documents", "run: {}\n---\nrun: {}\n",
         ["{f}:2: invalid YAML: but found another document (expected a single document in the stream "
          "started on line 1)"]),
    Case("file too large", "#" * MAX_FILE_BYTES + "\n",
         [f"{{f}}: file is larger than the limit of {MAX_FILE_BYTES} bytes"]),
    Case("several errors at once",
         "run:\n  device: tpu\ntrainer:\n  max_steps: 0\n  bogus: 1\ndata:\n  source: file\n  path: gone.csv\n",
         ["{f}:2: run.device: must be one of 'auto', 'cpu', 'cuda' (got 'tpu')",
          "{f}:4: trainer.max_steps: Input should be greater than or equal to 1 (got 0)",
          f"{{f}}:5: trainer.bogus: unknown key (allowed: {TRAINER_KEYS})",
          "{f}:8: data.path: data file not found: {d}/gone.csv"]),
    Case("override without '='", "", ["<command line>: override 'trainer.max_steps' is not key=value "
                                      "(e.g. trainer.max_steps=200)"], overrides=("trainer.max_steps",)),
    Case("override with empty key part", "", ["<command line>: override 'trainer..lr=1' has an empty key or key part",
                                              "<command line>: override '=3' has an empty key or key part"],
         overrides=("trainer..lr=1", "=3")),
    Case("override into a scalar", "trainer:\n  lr: 0.1\n",
         ["<command line>: override 'trainer.lr.scale=2' sets a key inside 'trainer.lr', which holds 0.1, "
          "not a mapping"], overrides=("trainer.lr.scale=2",)),
    Case("override value is bad YAML", "", ["<command line>: override 'model.widths=[1, 2' has a bad value: "
                                            "invalid YAML: expected ',' or ']', but got '<stream end>' "
                                            "(while parsing a flow sequence started on line 1)"],
         overrides=("model.widths=[1, 2",)),
    Case("override with a bad value", "trainer:\n  max_steps: 10\n",
         ["<command line>: trainer.max_steps: override 'trainer.max_steps=0': Input should be greater than or "
          "equal to 1 (got 0)"], overrides=("trainer.max_steps=0",)),
    Case("override with an unknown key", "trainer:\n  lr: 0.1\n",
         [f"<command line>: trainer.maxsteps: override 'trainer.maxsteps=3': unknown key, did you mean "
          f"'max_steps'? (allowed: {TRAINER_KEYS})"], overrides=("trainer.maxsteps=3",)),
    Case("override trips a section check", "run:\n  seed: 1\n",
         ["<command line>: data: override 'data.source=file': `path` is required when source is 'file'"],
         overrides=("data.source=file",)),
    Case("file and override errors together", "run:\n  device: tpu\n",
         ["{f}:2: run.device: must be one of 'auto', 'cpu', 'cuda' (got 'tpu')",
          "<command line>: seeds.per_layer: override 'seeds.per_layer=many': must be an integer (got 'many', "
          "a string)"], overrides=("seeds.per_layer=many",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_recipe_is_reported_exactly(tmp_path: Path, case: Case) -> None:
    for name, content in case.files.items():
        (tmp_path / name).write_text(content)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(case.text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_recipe(str(recipe), case.overrides)
    assert time.perf_counter() - started < 2.0  # the alias bomb in particular is rejected before expansion
    assert caught.value.exit_code == 2
    expected = [line.format(f=recipe, d=tmp_path) for line in case.expected]
    assert [str(problem) for problem in caught.value.problems] == expected
    assert str(caught.value) == "\n".join(expected)


def test_relative_recipe_path_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r.yaml").write_text("seeds:\n  per_layer: 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_recipe("r.yaml")
    assert str(caught.value) == "r.yaml:2: seeds.per_layer: Input should be greater than or equal to 1 (got 0)"


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "absent.yaml", "file not found"),
    (lambda d: d, "is a directory, not a YAML file"),
])
def test_unreadable_recipe_path(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"{path}: {message}"
    assert caught.value.exit_code == 2


def test_binary_file_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"run:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text (invalid start byte at byte 13)"
