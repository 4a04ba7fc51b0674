"""A run file replaced by something else while the run trains: a directory made where ``summary.json``
or a file of ``final/`` belongs, the recipe copy ``recipe.yaml`` removed or replaced. The end of the run
replaces the first and hashes the second (``run_end`` binds it); either ended in a Python traceback
(``IsADirectoryError`` from the rename, ``UnsafeInput`` or ``FileNotFoundError`` from the hash).

Each is the one-line error of a run file that is not the run's own (exit 3, naming the file), raised
before the run's results are written, so that nothing claims results the run never finished writing and
the last checkpoint stays intact: restore the file and resume. The swap is made from ``fit``'s
``on_event`` callback at the first checkpoint, in process, on real files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from esper_core import Trainer
from esper_core.checkpoints import store
from esper_core.errors import CheckpointError

RECIPE = """\
run: {{name: swapped, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
policy: {{max_seeds: 0}}
trainer: {{max_steps: 20, eval_every: 10, log_every: 10}}
checkpoint: {{every_steps: 10}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""


def _directory(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _removed(path: Path) -> None:
    path.unlink()


def _train_swapping(tmp_path: Path, name: str, swap: Callable[[Path], None]) -> tuple[Path, CheckpointError]:
    """Train, applying ``swap`` to ``run_dir/name`` when the first checkpoint is recorded; the run must
    stop with a CheckpointError, returned with the run directory."""
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(workspace=tmp_path / "ws"), encoding="utf-8")
    trainer = Trainer.from_recipe(tmp_path / "recipe.yaml", [f"run.output_dir={tmp_path / 'runs'}"])
    swapped: list[Path] = []

    def on_event(event: dict) -> None:
        if event.get("event") == "checkpoint" and not swapped:
            assert trainer.run_dir is not None
            swapped.append(trainer.run_dir)
            swap(trainer.run_dir / name)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(CheckpointError) as caught:
            trainer.fit(on_event=on_event)
    finally:
        torch.set_num_threads(before)
    assert swapped, "the run recorded no checkpoint"
    return swapped[0], caught.value


def _nothing_claimed(run: Path) -> None:
    """The run stopped before its results: no run_end, no summary file, and its checkpoints verify."""
    assert b'"run_end"' not in (run / "events.jsonl").read_bytes()
    assert not (run / "summary.json").is_file()
    assert store.find(run, strict=True, warn=lambda _: None).path.name == store.checkpoint_name(20)


@pytest.mark.parametrize("name", ["summary.json", "final/model.safetensors", "final/manifest.json"])
def test_a_directory_where_the_run_writes_its_results_stops_it_with_one_located_error(tmp_path: Path,
                                                                                      name: str) -> None:
    run, error = _train_swapping(tmp_path, name, _directory)
    assert error.exit_code == 3
    assert str(error).startswith(f"{run / name}: a directory in place of the run's own file")
    assert len(str(error).splitlines()) == 1
    assert (run / name).is_dir()  # what someone put there is theirs: left as it was
    _nothing_claimed(run)
    assert not (run / "final" / "topology.json").exists()  # final/ was not written either


@pytest.mark.parametrize("swap", [_directory, _fifo, _removed], ids=["directory", "fifo", "removed"])
def test_a_recipe_copy_replaced_while_the_run_trains_stops_it_with_one_located_error(
        tmp_path: Path, swap: Callable[[Path], None]) -> None:
    run, error = _train_swapping(tmp_path, "recipe.yaml", swap)
    assert error.exit_code == 3
    assert str(error).startswith(f"{run / 'recipe.yaml'}: ")
    assert len(str(error).splitlines()) == 1
    _nothing_claimed(run)
