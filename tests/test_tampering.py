"""Tampering suite (issue 11): every file of a finished run edited, deleted, truncated, nested,
padded huge or replaced by a FIFO -> `esper report --verify` exits 4 naming it, never a traceback.

Each case runs on a copy of one real run, exactly as ``esper train`` wrote it: its ``run_end`` binds
the final artifacts and the summary's figures, so edits to metrics, model, topology or summary are
caught as surely as edits to the chain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from run_helpers import MIRRORED_RECIPE as RECIPE
from run_helpers import esper_report, finished_run

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
CASES: list[tuple[str, Damage]] = [
    # (file, damage)
    ("events.jsonl", edit_middle_line), ("events.jsonl", delete_middle_line),
    ("events.jsonl", nest_middle_line), ("events.jsonl", huge_middle_line),
    ("events.jsonl", truncate), ("events.jsonl", delete), ("events.jsonl", pad_huge),
    ("events.jsonl", fifo),
    ("summary.json", edit_accuracy), ("summary.json", delete), ("summary.json", truncate),
    ("summary.json", nest), ("summary.json", pad_huge), ("summary.json", fifo),
    ("metrics.jsonl", edit_middle_line), ("metrics.jsonl", delete_middle_line),
    ("metrics.jsonl", nest_middle_line), ("metrics.jsonl", truncate), ("metrics.jsonl", delete),
    ("metrics.jsonl", pad_huge), ("metrics.jsonl", fifo),
    ("final/model.safetensors", edit_bytes), ("final/model.safetensors", truncate),
    ("final/model.safetensors", delete), ("final/model.safetensors", pad_huge),
    ("final/model.safetensors", fifo),
    ("final/topology.json", edit_bytes), ("final/topology.json", truncate),
    ("final/topology.json", delete), ("final/topology.json", nest),
    ("final/topology.json", fifo),
    ("recipe.yaml", edit_recipe), ("recipe.yaml", truncate), ("recipe.yaml", delete),
    ("recipe.yaml", nest), ("recipe.yaml", pad_huge), ("recipe.yaml", fifo),
    ("recipe.sha256", edit_hash), ("recipe.sha256", truncate), ("recipe.sha256", delete),
    ("recipe.sha256", pad_huge), ("recipe.sha256", fifo),
    ("final/manifest.json", edit_bytes), ("final/manifest.json", delete),
]


@pytest.mark.parametrize("name, damage", CASES, ids=[f"{n}-{d.__name__}" for n, d in CASES])
def test_tampering_is_detected_and_named(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         name: str, damage: Damage) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    assert esper_report("--verify", run).exit_code == 0
    damage(run / name)
    result = esper_report("--verify", run)
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and any(name in line for line in errors), result.stderr


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


class Hung(BaseException):
    """Raised by the alarm: no handler of the product catches it (a TimeoutError is an OSError, which the
    recipe reader reports as an unreadable file)."""


FIFO_FILES = ["events.jsonl", "summary.json", "metrics.jsonl", "recipe.yaml", "recipe.sha256",
              "final/model.safetensors", "final/topology.json", "final/manifest.json"]


@pytest.mark.parametrize("name", FIFO_FILES)
def test_the_report_of_a_run_with_a_fifo_in_place_of_a_file_names_it_and_never_hangs(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``esper report`` (not only ``--verify``) reads the run's recipe once more, for its storage settings:
    a FIFO there blocked that read forever. An alarm interrupts a blocked open, so a hang fails the test
    (within a minute)."""
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    fifo(run / name)

    def hung(signum: int, frame: object) -> None:
        raise Hung(f"esper report hung on {name}, a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        result = esper_report(run)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 4, result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and str(run / name) in errors[0], result.stderr
