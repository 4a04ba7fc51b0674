"""The tables shipped in ``esper_core.datasets`` are exactly scikit-learn's (scikit-learn is a test-only
dependency, used here as the reference), and reading them imports neither scikit-learn nor torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from esper_core.datasets import NAMES, load_table


@pytest.mark.parametrize("name,loader,shape", [("digits", "load_digits", (1797, 65)),
                                               ("breast_cancer", "load_breast_cancer", (569, 31)),
                                               ("wine", "load_wine", (178, 14))])
def test_each_table_equals_what_scikit_learn_loads(name: str, loader: str, shape: tuple[int, int]) -> None:
    from sklearn import datasets

    table, reference = load_table(name), getattr(datasets, loader)()
    assert table.shape == shape and table.dtype == np.float64
    assert np.array_equal(table[:, :-1], reference.data)
    assert np.array_equal(table[:, -1].astype(np.int64), reference.target)


def test_diabetes_is_scikit_learns_unscaled_table_with_its_target() -> None:
    from sklearn import datasets

    table, reference = load_table("diabetes"), datasets.load_diabetes(scaled=False)
    assert table.shape == (442, 11)
    assert np.array_equal(table[:, :-1], reference.data) and np.array_equal(table[:, -1], reference.target)


def test_an_unknown_name_lists_the_known_tables() -> None:
    with pytest.raises(KeyError, match="unknown bundled table 'iris' .*digits, breast_cancer, wine, diabetes"):
        load_table("iris")
    assert NAMES == ("digits", "breast_cancer", "wine", "diabetes")


def test_loading_imports_neither_scikit_learn_nor_torch() -> None:
    code = ("import sys; from esper_core.datasets import load_table; load_table('digits'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'torch'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
