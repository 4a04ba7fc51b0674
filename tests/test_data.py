"""Datasets: deterministic stratified splits, train-only standardisation, every source, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from esper_core.errors import ConfigError
from esper_core.recipe.schema import DataConfig
from esper_core.training.data import DataSplits, build_data, split_indices

TESTS_DIR = Path(__file__).parent


@pytest.fixture
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def build(tmp_path: Path = TESTS_DIR, seed: int = 0, **fields: object) -> DataSplits:
    return build_data(DataConfig(**fields), seed=seed, base_dir=tmp_path)


def tensors(splits: DataSplits) -> list[torch.Tensor]:
    return [t for ds in (splits.train, splits.val, splits.test) for t in ds.tensors]


def error_text(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


# --- splits -------------------------------------------------------------------------------------

def test_same_seed_gives_identical_splits_and_another_seed_different_ones() -> None:
    first, again, other = build(seed=3), build(seed=3), build(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(again)))
    assert not torch.equal(first.val.tensors[0], other.val.tensors[0])


def test_split_indices_are_disjoint_complete_sized_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, val, test = split_indices(labels, 0.2, 0.1, np.random.default_rng(0))
    assert (len(train), len(val), len(test)) == (70, 20, 10)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    for part, fraction in ((val, 0.2), (test, 0.1)):
        counts = np.bincount(labels[part], minlength=4)
        assert np.all(np.abs(counts - fraction * np.array([50, 30, 15, 5])) <= 1)


def test_split_indices_depend_on_the_generator_seed() -> None:
    labels = np.zeros(100, dtype=np.int64)
    a = split_indices(labels, 0.2, 0.2, np.random.default_rng(0))
    b = split_indices(labels, 0.2, 0.2, np.random.default_rng(1))
    assert not np.array_equal(a[1], b[1])


def test_split_sizes_follow_the_fractions() -> None:
    splits = build(val_fraction=0.2, test_fraction=0.1)
    sizes = len(splits.train), len(splits.val), len(splits.test)
    assert sizes == (1797 - 359 - 180, 359, 180)


def test_too_few_samples_is_a_config_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "tiny.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(ConfigError, match="too few"):
        build(tmp_path, source="file", path="tiny.npz")


# --- standardisation ----------------------------------------------------------------------------

def test_standardisation_uses_training_statistics_only() -> None:
    raw, scaled = build(standardize=False), build(standardize=True)
    x = raw.train.tensors[0].double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant border pixels stay put
    for raw_ds, scaled_ds in zip((raw.train, raw.val, raw.test), (scaled.train, scaled.val, scaled.test)):
        expected = ((raw_ds.tensors[0].double() - mean) / std).float()
        assert torch.allclose(scaled_ds.tensors[0], expected, atol=1e-5)
        assert torch.equal(scaled_ds.tensors[1], raw_ds.tensors[1])
    assert not torch.allclose(scaled.val.tensors[0].mean(0), torch.zeros(64), atol=1e-3)


def test_images_are_standardised_per_channel() -> None:
    train = build(layout="image").train.tensors[0]
    assert train.shape[1:] == (1, 8, 8)
    assert abs(train.mean().item()) < 1e-5 and abs(train.std(unbiased=False).item() - 1) < 1e-4
    assert train[:, 0, 0, 0].abs().max() > 0  # per-pixel scaling would have zeroed the constant corner


# --- built-in and synthetic sources -------------------------------------------------------------

@pytest.mark.parametrize(("source", "layout", "shape", "classes", "n"), [
    ("digits", "flat", (64,), 10, 1797),
    ("digits", "image", (1, 8, 8), 10, 1797),
    ("breast_cancer", "flat", (30,), 2, 569),
    ("wine", "flat", (13,), 3, 178),
])
def test_builtin_sources(source: str, layout: str, shape: tuple[int, ...], classes: int, n: int) -> None:
    splits = build(source=source, layout=layout)
    assert (splits.input_shape, splits.num_classes, splits.name) == (shape, classes, source)
    assert sum(len(ds) for ds in (splits.train, splits.val, splits.test)) == n
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == shape
    assert set(y.tolist()) == set(range(classes))


@pytest.mark.parametrize("source", ["wine", "synthetic"])
def test_tabular_sources_have_no_image_layout(source: str) -> None:
    with pytest.raises(ConfigError, match="layout: flat"):
        build(source=source, layout="image")


def test_the_layout_reference_says_what_each_source_does(tmp_path: Path) -> None:
    """It said only "`image` gives `digits` as 1x8x8 images ... Tabular sources are always flat": an image
    `.npz` is flattened by the default `flat` (a CNN recipe needs `layout: image`), and `image` on a
    tabular source is an error, not ignored."""
    described = DataConfig.model_fields["layout"].description or ""
    assert "`file`" in described and "`image` is an error" in described
    np.savez(tmp_path / "img.npz", x=np.zeros((20, 2, 4, 4)), y=np.arange(20) % 2)
    assert build(tmp_path, source="file", path="img.npz").input_shape == (32,)
    with pytest.raises(ConfigError, match="no image layout"):
        build(source="mnist1d", layout="image", mnist1d={"n_samples": 100})


def test_synthetic_is_deterministic_in_the_seed() -> None:
    settings = {"n_samples": 300, "n_features": 5, "n_classes": 4}
    first, again, other = (build(seed=s, source="synthetic", synthetic=settings) for s in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(tensors(first), tensors(again)))
    assert not torch.equal(first.train.tensors[0][:5], other.train.tensors[0][:5])
    assert (first.input_shape, first.num_classes) == ((5,), 4)
    counts = torch.bincount(torch.cat([first.train.tensors[1], first.val.tensors[1], first.test.tensors[1]]))
    assert len(counts) == 4 and counts.min() >= 30  # every class well represented


def test_synthetic_samples_do_not_depend_on_the_split_fractions() -> None:
    settings = {"n_samples": 100, "n_features": 3}
    a = build(source="synthetic", synthetic=settings, standardize=False, val_fraction=0.1)
    b = build(source="synthetic", synthetic=settings, standardize=False, val_fraction=0.3)
    rows = [torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]]) for s in (a, b)]
    assert torch.equal(*(r[r[:, 0].argsort()] for r in rows))


# --- files --------------------------------------------------------------------------------------

def all_rows(splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([ds.tensors[0] for ds in (splits.train, splits.val, splits.test)])
    y = torch.cat([ds.tensors[1] for ds in (splits.train, splits.val, splits.test)])
    order = x[:, 0].argsort()  # the first feature is the row number
    return x[order], y[order]


def test_npz_round_trip_remaps_labels(tmp_path: Path) -> None:
    x = np.stack([np.arange(30), np.linspace(0, 1, 30)], axis=1)
    labels = np.array([5, 7, 9] * 10)
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    splits = build(tmp_path, source="file", path="d.npz", standardize=False)
    assert (splits.input_shape, splits.num_classes, splits.name) == ((2,), 3, "d.npz")
    got_x, got_y = all_rows(splits)
    assert torch.allclose(got_x, torch.tensor(x, dtype=torch.float32))
    assert torch.equal(got_y, torch.tensor([0, 1, 2] * 10))


def test_npz_images_get_a_channel_axis_in_image_layout(tmp_path: Path) -> None:
    np.savez(tmp_path / "img.npz", x=np.random.default_rng(0).random((20, 5, 5)), y=np.arange(20) % 2)
    assert build(tmp_path, source="file", path="img.npz", layout="image").input_shape == (1, 5, 5)
    assert build(tmp_path, source="file", path="img.npz", layout="flat").input_shape == (25,)


def test_csv_round_trip_with_label_column_anywhere(tmp_path: Path) -> None:
    lines = ["row, kind ,b"] + [f"{i},{[2, 4][i % 2]},{i / 10}" for i in range(20)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    splits = build(tmp_path, source="file", path="t.csv", label_column="kind", standardize=False)
    assert (splits.input_shape, splits.num_classes) == ((2,), 2)
    got_x, got_y = all_rows(splits)
    assert torch.allclose(got_x[:, 1], torch.arange(20) / 10)
    assert torch.equal(got_y, torch.arange(20) % 2)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize(("name", "content", "label_column", "message"), [
    ("a.csv", "f1,f2\n1,2\n", "label", "no label column 'label' (columns: f1, f2)"),
    ("b.csv", "f1,label\n1,0\nabc,1\n", "label", ":3: column 'f1': 'abc' is not a number"),
    ("c.csv", "f1,label\n1,0\n1\n", "label", ":3: 1 fields, the header has 2"),
    ("d.csv", "f1,label\n1,0.5\n2,1\n3,0\n", "label", "labels must be integer class ids"),
    ("e.csv", "", "label", "empty file"),
    ("f.csv", "f1,label\nnan,0\n1,1\n2,0\n", "label", "NaN or infinite"),
    ("g.txt", "1 2 3", "label", "unsupported file type '.txt'"),
    ("h.npz", "not a zip", "label", "not a readable .npz"),
])
def test_bad_text_files_name_the_file_and_the_fault(
        tmp_path: Path, name: str, content: str, label_column: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as excinfo:
        build(tmp_path, source="file", path=name, label_column=label_column)
    assert str(tmp_path / name) in error_text(excinfo) and message in error_text(excinfo)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((4, 2))}, "missing array 'y' (found: x)"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "y must have one row per sample to match x (4, 2)"),
    ({"x": np.zeros(4), "y": np.zeros(4)}, "x must have one row per sample"),
    ({"x": np.array([["a"]] * 4), "y": np.zeros(4)}, "x must be numeric"),
    ({"x": np.array([[1], [2]], dtype=object), "y": np.zeros(2)}, "not a readable .npz"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "single class"),
])
def test_bad_npz_files_name_the_file_and_the_fault(
        tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError) as excinfo:
        build(tmp_path, source="file", path="bad.npz")
    assert str(tmp_path / "bad.npz") in error_text(excinfo) and message in error_text(excinfo)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        build(tmp_path, source="file", path="nowhere.csv")


# --- factories ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("factories_importable")
def test_factory_dataset_is_split_here() -> None:
    splits = build(source="factory", factory="factories:blobs", factory_kwargs={"n": 40}, standardize=False)
    assert (splits.input_shape, splits.num_classes, splits.name) == ((4,), 2, "factories:blobs")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (28, 6, 6)
    again = build(source="factory", factory="factories:blobs", factory_kwargs={"n": 40}, standardize=False)
    assert all(torch.equal(a, b) for a, b in zip(splits.val.tensors, again.val.tensors))
    # in-memory tensors stay tensors (batches are gathered at once, and live on the GPU there)
    assert all(isinstance(ds, TensorDataset) for ds in (splits.train, splits.val, splits.test))


@pytest.mark.usefixtures("factories_importable")
def test_factory_splits_are_used_as_given_and_standardised_with_train_statistics() -> None:
    splits = build(source="factory", factory="factories:image_splits")
    assert (splits.input_shape, splits.num_classes) == ((1, 4, 4), 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    train = torch.stack([splits.train[i][0] for i in range(12)])
    assert abs(train.mean().item()) < 1e-5 and abs(train.std(unbiased=False).item() - 1) < 1e-4
    assert splits.val[0][0].mean().item() > 10  # val values are far above the train mean


@pytest.mark.usefixtures("factories_importable")
@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    ("no_such_module:make", {}, "cannot import 'no_such_module:make'"),
    ("factories:missing", {}, "'factories:missing': module 'factories' has no callable 'missing'"),
    ("factories:not_a_dataset", {}, "'factories:not_a_dataset' returned list"),
    ("factories:blobs", {"colour": 1}, "'factories:blobs' cannot be called with ['colour']"),
])
def test_factory_problems_name_the_factory(factory: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build(source="factory", factory=factory, factory_kwargs=kwargs)
    assert message in error_text(excinfo) and "data.factory" in error_text(excinfo)


def test_bundled_sources_use_the_shipped_tables() -> None:
    """digits as images and diabetes as a regression table come from esper_core.datasets."""
    from esper_core.datasets import load_table
    from esper_core.training.data.bundled import bundled

    digits = bundled("digits", "image")
    assert digits.x.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert np.array_equal(digits.x.reshape(1797, 64), load_table("digits")[:, :-1].astype(np.float32))
    diabetes = bundled("diabetes", "flat")
    assert diabetes.x.shape == (442, 10) and diabetes.y.dtype == np.float32 and diabetes.num_classes == 1


FACTORY_MODULE = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
                  "def make():\n    g = torch.Generator().manual_seed(0)\n    x = torch.randn(90, 4, generator=g)\n"
                  "    return TensorDataset(x, (x[:, 0] > 0).long())\n"
                  "def build(input_shape, num_classes):\n"
                  "    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))\n")
"""A data factory (``make``) and a model factory (``build``) in one module, for tests that keep it
beside a recipe."""


def test_factories_beside_the_recipe_are_imported_from_its_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``esper train`` (a console script: neither the working directory nor the recipe's is on
    ``sys.path``) failed with "No module named ..." for a factory module beside the recipe, while
    ``load_run`` and ``esper export`` of the same run import it from the recipe's directory, "as in
    training"."""
    import sys

    from esper_core.training.dry_run import dry_run
    from esper_core.training.trainer import Trainer

    project = tmp_path / "project"
    project.mkdir()
    (project / "beside_recipe_factories.py").write_text(FACTORY_MODULE)
    recipe = project / "recipe.yaml"
    recipe.write_text(f"run: {{name: beside, output_dir: {tmp_path / 'runs'}}}\n"
                      "data: {source: factory, factory: 'beside_recipe_factories:make', batch_size: 16}\n"
                      "model: {arch: factory, factory: 'beside_recipe_factories:build'}\n"
                      "seeds: {targets: ['0']}\npolicy: {max_seeds: 0}\ntrainer: {max_steps: 3, eval_every: 3}\n")
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    try:
        assert [layer["layer"] for layer in dry_run(recipe)["layers"]] == ["0"]
        assert Trainer.from_recipe(recipe).fit()["steps"] == 3
    finally:
        sys.modules.pop("beside_recipe_factories", None)
    assert sys.path == path  # the directory is importable while the factories are imported, not after


def test_a_resume_or_export_without_the_factory_module_names_where_it_was_looked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose factory module beside the recipe is gone: ``esper resume`` said to put it "in the
    recipe's directory" while locating the error in the run's own copy of the recipe (whose directory
    is not searched: the run's recipe directory is), and ``load_run``/``esper export`` placed it at
    ``<recipe>``, no file. Both now name the directory searched and the line of the run's recipe."""
    import shutil
    import sys

    from esper_core import load_run
    from esper_core.training.trainer import Trainer

    project = tmp_path / "project"
    (project / "gone_pkg").mkdir(parents=True)
    (project / "gone_pkg" / "__init__.py").write_text(FACTORY_MODULE)
    recipe = project / "recipe.yaml"
    recipe.write_text(f"run: {{name: gone, output_dir: {tmp_path / 'runs'}}}\n"
                      "data: {source: factory, factory: 'gone_pkg:make', batch_size: 16}\n"
                      "model: {arch: factory, factory: 'gone_pkg:build'}\n"
                      "seeds: {targets: ['0']}\npolicy: {max_seeds: 0}\ntrainer: {max_steps: 4, eval_every: 2}\n"
                      "checkpoint: {every_steps: 2}\ntelemetry: {progress: none}\n")
    monkeypatch.chdir(tmp_path)
    try:
        run_dir = Path(Trainer.from_recipe(recipe).fit()["run_dir"])
    finally:
        sys.modules.pop("gone_pkg", None)
    shutil.rmtree(project / "gone_pkg")
    hint = f"(is the module installed, in {project} (the recipe's directory), or in a directory on PYTHONPATH?)"
    with pytest.raises(ConfigError) as resumed:
        Trainer.resume(run_dir)
    assert str(resumed.value).startswith(f"{run_dir / 'recipe.yaml'}:") and hint in str(resumed.value)
    with pytest.raises(ConfigError) as loaded:
        load_run(run_dir)
    (problem,) = loaded.value.problems
    assert problem.source == str(run_dir / "recipe.yaml") and problem.field == "model.factory", problem
    assert problem.message.startswith("cannot import 'gone_pkg:build': No module named 'gone_pkg'") and hint in problem.message
