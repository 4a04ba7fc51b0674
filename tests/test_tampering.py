"""Tampering suite (issue 11): every file of a finished run edited, deleted, truncated, nested,
padded huge or replaced by a FIFO -> `esper report --verify` exits 4 naming it, never a traceback.

Each case runs on two copies of one real run:

- ``per_contract``: its ``run_end`` binds the final artifacts and the summary's figures as the
  trainer is to record them (``run_helpers.finish_per_contract``); every case must pass today;
- ``as_trained``: the run exactly as ``esper train`` wrote it. The cases that only the ``run_end``
  binding can catch (edits to metrics, model, topology, and to summary figures) carry the
  ``needs_trainer_wiring`` marker there: they are skipped until the trainer records the binding
  and the guard in ``conftest.py`` is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from run_helpers import MIRRORED_RECIPE as RECIPE
from run_helpers import esper_report, finish_per_contract, finished_run

MIDDLE = 3


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tampered")
    return finished_run(root, RECIPE.format(workspace=root / "workspace"))


# --- damages: each takes the file's path ----------------------------------------------------------

def edit_middle_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[MIDDLE])
    record["step"] = record.get("step", 0) + 1
    lines[MIDDLE] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def delete_middle_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:MIDDLE] + lines[MIDDLE + 1:]) + "\n")


def nest_middle_line(path: Path) -> None:
    """A 400 KB line of nested brackets (a RecursionError for a naive reader)."""
    lines = path.read_text().splitlines()
    lines[MIDDLE] = "[" * 200_000 + "]" * 200_000
    path.write_text("\n".join(lines) + "\n")


def huge_middle_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[MIDDLE] = json.dumps({"seq": MIDDLE, "pad": "x" * (3 << 20)})
    path.write_text("\n".join(lines) + "\n")


def edit_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def nest(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def pad_huge(path: Path) -> None:
    """Grow the file to 2 GiB (sparse: it costs no disk)."""
    os.truncate(path, 2 << 30)


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def edit_accuracy(path: Path) -> None:
    summary = json.loads(path.read_text())
    summary["val_accuracy"] = 0.999
    path.write_text(json.dumps(summary, indent=2))


def edit_recipe(path: Path) -> None:
    path.write_text(path.read_text().replace("max_seeds: 2", "max_seeds: 20"))


def edit_hash(path: Path) -> None:
    path.write_text("0" * 64 + "\n")


Damage = Callable[[Path], None]
CASES: list[tuple[str, Damage, bool]] = [
    # (file, damage, caught only through the run_end binding)
    ("events.jsonl", edit_middle_line, False), ("events.jsonl", delete_middle_line, False),
    ("events.jsonl", nest_middle_line, False), ("events.jsonl", huge_middle_line, False),
    ("events.jsonl", truncate, False), ("events.jsonl", delete, False), ("events.jsonl", pad_huge, False),
    ("events.jsonl", fifo, False),
    ("summary.json", edit_accuracy, True), ("summary.json", delete, False), ("summary.json", truncate, False),
    ("summary.json", nest, False), ("summary.json", pad_huge, False), ("summary.json", fifo, False),
    ("metrics.jsonl", edit_middle_line, True), ("metrics.jsonl", delete_middle_line, True),
    ("metrics.jsonl", nest_middle_line, True), ("metrics.jsonl", truncate, True), ("metrics.jsonl", delete, True),
    ("metrics.jsonl", pad_huge, True), ("metrics.jsonl", fifo, True),
    ("final/model.safetensors", edit_bytes, True), ("final/model.safetensors", truncate, True),
    ("final/model.safetensors", delete, True), ("final/model.safetensors", pad_huge, True),
    ("final/model.safetensors", fifo, True),
    ("final/topology.json", edit_bytes, True), ("final/topology.json", truncate, True),
    ("final/topology.json", delete, True), ("final/topology.json", nest, True),
    ("final/topology.json", fifo, True),
    ("recipe.yaml", edit_recipe, False), ("recipe.yaml", truncate, False), ("recipe.yaml", delete, False),
    ("recipe.yaml", nest, False), ("recipe.yaml", pad_huge, False), ("recipe.yaml", fifo, False),
    ("recipe.sha256", edit_hash, False), ("recipe.sha256", truncate, False), ("recipe.sha256", delete, False),
    ("recipe.sha256", pad_huge, False), ("recipe.sha256", fifo, False),
]


def _params() -> list:
    params = []
    for name, damage, needs_binding in CASES:
        for variant in ("per_contract", "as_trained"):
            marks = [pytest.mark.needs_trainer_wiring] if needs_binding and variant == "as_trained" else []
            params.append(pytest.param(variant, name, damage, marks=marks, id=f"{variant}-{name}-{damage.__name__}"))
    return params


@pytest.mark.parametrize("variant, name, damage", _params())
def test_tampering_is_detected_and_named(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         variant: str, name: str, damage: Damage) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    if variant == "per_contract":
        finish_per_contract(run)
        monkeypatch.setenv("ESPER_DATABASE_URL", "sqlite:////nonexistent/esper.db")  # its run_end was rewritten
    else:
        monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
        assert esper_report("--verify", run).exit_code == 0
    damage(run / name)
    result = esper_report("--verify", run)
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and any(name in line for line in errors), result.stderr


def test_the_untouched_run_verifies_in_both_variants(finished: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    assert esper_report("--verify", finished).exit_code == 0
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    finish_per_contract(run)
    monkeypatch.setenv("ESPER_DATABASE_URL", "sqlite:////nonexistent/esper.db")
    result = esper_report("--verify", run)
    assert result.exit_code == 0, result.output


def test_the_report_of_a_run_with_damaged_checkpoints_is_written_without_a_traceback(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints are outside the chain (they are the resume's business, verified there): a report
    lists what it can read of them and never crashes on what it cannot."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    checkpoints = run / "checkpoints"
    (checkpoints / "step-00000010").mkdir(parents=True)
    (checkpoints / "step-00000010" / "manifest.json").write_text('{"files": {"x": {"bytes": "many"}}, "step": 10}')
    (checkpoints / "step-00000020").mkdir()
    nest(checkpoints / "step-00000020" / "manifest.json")
    (checkpoints / "LATEST").write_bytes(os.urandom(40) + b"\xff")
    result = esper_report(run, "--format", "json")
    assert result.exit_code == 0, result.output
    listed = json.loads((run / "report" / "report.json").read_text())["checkpoints"]
    assert [(c["name"], c["bytes"], c["latest"]) for c in listed] == [("step-00000010", 0, False),
                                                                       ("step-00000020", 0, False)]


WRONG_TYPES = [
    ("events.jsonl", "step", "many"), ("events.jsonl", "layer", ["a"]), ("events.jsonl", "slot", {"a": 1}),
    ("events.jsonl", "time", 1e30), ("events.jsonl", "event", ["germinate"]), ("events.jsonl", "layers", 1.5),
    ("events.jsonl", "versions", True), ("events.jsonl", "params", "x"),
    ("summary.json", "steps", "many"), ("summary.json", "params_initial", "x"), ("summary.json", "params_final", []),
    ("summary.json", "seeds", [1]), ("summary.json", "fossilized", 5), ("summary.json", "val_accuracy", "x"),
]


@pytest.mark.parametrize("name, key, value", WRONG_TYPES, ids=[f"{n}-{k}" for n, k, _ in WRONG_TYPES])
def test_the_report_of_a_run_with_fields_of_the_wrong_type_is_written_without_a_traceback(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, key: str, value: object) -> None:
    """The report is written even for a tampered run (its first line says the audit failed): no field
    of any type in any record may crash it. Found by editing fields of real runs at random."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    path = run / name
    if name == "events.jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for record in records:
            if key in record or key in ("layer", "slot", "time", "event") or record["event"] == "run_start":
                record[key] = value
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    result = esper_report(run, "--format", "md,html,json")
    assert (result.exception is None or isinstance(result.exception, SystemExit)) and result.exit_code in (0, 4), \
        result.output
    assert (run / "report" / "report.html").is_file() and "Traceback" not in result.output


@pytest.mark.parametrize("text", ["seeds: [1]\npolicy: 3\nrun: x\n", "seeds: {per_layer: x}\nmodel: [a]\ndata: 5\n"])
def test_the_report_of_a_run_with_a_recipe_of_the_wrong_shape_is_written(finished: Path, tmp_path: Path,
                                                                          text: str) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "recipe.yaml").write_text(text)
    result = esper_report(run)
    assert result.exit_code == 4 and "Traceback" not in result.output and (run / "report" / "report.md").is_file()
