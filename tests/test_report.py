"""`esper report RUN`: what a compliance report contains, that its HTML is self-contained, and that
it really renders (headless Chromium screenshot).

One real run feeds every test. Its recipe is chosen so the report has something in every section:
seeds germinate inside the first half and are all fossilized (``fossilize_margin: -1``) long before
the end (change history, kernels, lifecycle timeline), checkpoints are written every 60 steps (the
checkpoint list), and the anomaly detector's stall threshold is set so high that it must record a
``loss_stall`` (the anomaly list). How many seeds the policy grows is its business: counts are taken
from the run's own event log. Figures in the report are
checked against the run's own files, not against constants, so the test pins the plumbing rather
than what the model learned.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import require_tool
from run_helpers import esper_report, finished_run
from esper_core.telemetry.report.plots import EVENT_COLORS, PLOT_IDS, SERIES_COLORS, STATE_COLORS

RECIPE = """\
run: {name: reported, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], per_layer: 2, blueprints: [lowrank_adapter], rank: 4,
        incubation_steps: 20, blend_steps: 20, probation_steps: 10, embargo_steps: 100000,
        fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 30, growth_window: [0.05, 0.5], max_seeds: 4, max_added_params: 5000}
trainer: {max_steps: 160, lr: 0.01, eval_every: 10, log_every: 10}
checkpoint: {every_steps: 60, keep: 3}
telemetry: {progress: none, anomaly_window: 4, anomaly_stall_improvement: 1.0}
"""

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("reported"), RECIPE)


@pytest.fixture(scope="module")
def reported(finished: Path) -> dict[str, Any]:
    result = esper_report(finished)
    assert result.exit_code == 0, result.output
    out = finished / "report"
    return {"result": result, "out": out, "json": json.loads((out / "report.json").read_text(encoding="utf-8")),
            "html": (out / "report.html").read_text(encoding="utf-8"),
            "md": (out / "report.md").read_text(encoding="utf-8")}


def events_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines()]


def test_all_formats_are_written_into_the_run(reported: dict[str, Any]) -> None:
    names = {p.name for p in reported["out"].iterdir()}
    assert {"report.md", "report.html", "report.json"} <= names
    assert {f"{plot_id}.svg" for plot_id in PLOT_IDS} <= names  # the Markdown's images
    assert all(f"wrote {reported['out'] / n}" in reported["result"].stdout for n in ("report.json", "report.md"))


def test_identity_names_the_recipe_software_data_device_and_times(finished: Path, reported: dict[str, Any]) -> None:
    run = reported["json"]["run"]
    assert run["recipe_sha256"] == (finished / "recipe.sha256").read_text(encoding="utf-8").strip()
    assert run["versions"]["torch_version"] == torch.__version__ and run["versions"]["esper_version"]
    assert run["data"]["source"] == "digits" and run["device"] == "cpu" and run["steps"] == 160
    assert run["started_at"] and run["ended_at"] and run["started_at"] <= run["ended_at"]
    assert reported["json"]["audit"]["ok"] and reported["json"]["audit"]["recipe_ok"]
    assert "audit passed" in reported["md"].splitlines()[0]


def test_change_history_has_every_event_with_reasons_and_measured_effects(finished: Path,
                                                                          reported: dict[str, Any]) -> None:
    events = events_of(finished)
    changes = reported["json"]["changes"]
    assert [c["seq"] for c in changes] == [e["seq"] for e in events if e["event"] not in ("run_start", "run_end")]
    germinations = [c for c in changes if c["event"] == "germinate"]
    verdicts = [c for c in changes if c["event"] == "fossilize"]
    assert germinations and len(verdicts) == len(germinations)
    assert all(c["reason"] in c["detail"] and "periodic trigger" in c["detail"] for c in germinations)
    for c in verdicts:
        assert f"gain {c['loss_gain']:.4g}" in c["detail"] and "kept" in c["detail"]
        assert {"val_loss_with", "val_loss_without", "val_acc_with", "val_acc_without", "margin"} <= set(c)
    assert germinations[0]["detail"] in reported["md"] and verdicts[0]["detail"] in reported["md"]


def test_kernels_checkpoints_anomalies_and_budgets(finished: Path, reported: dict[str, Any]) -> None:
    data = reported["json"]
    events = events_of(finished)
    assert [k["address"] for k in data["kernels"]] == [e["kernel"] for e in events if e["event"] == "germinate"]
    assert all(k["outcome"] == "fossilized" and k["blueprint"] == "lowrank_adapter" for k in data["kernels"])
    assert data["kernels"][0]["address"] in reported["md"]
    on_disk = sorted(p.name for p in (finished / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert [c["name"] for c in data["checkpoints"]] == on_disk == ["step-00000060", "step-00000120"]
    assert [c["latest"] for c in data["checkpoints"]] == [False, True] and all(c["bytes"] > 0 for c in data["checkpoints"])
    recorded = [e for e in events if e["event"] == "anomaly"]
    assert recorded and [a["kind"] for a in data["anomalies"]] == [e["kind"] for e in recorded]
    assert data["anomalies"][0]["kind"] == "loss_stall" and data["anomalies"][0]["reason"] in reported["md"]
    summary = json.loads((finished / "summary.json").read_text(encoding="utf-8"))
    budgets = {b["key"]: b for b in data["budgets"]}
    grown = sum(1 for e in events if e["event"] == "germinate")  # all kept, none removed: the peak is all of them
    assert (budgets["policy.max_seeds"]["limit"], budgets["policy.max_seeds"]["used"]) == (4, grown)
    added = budgets["policy.max_added_params"]
    assert (added["limit"], added["used"]) == (5000, summary["params_final"] - summary["params_initial"])
    assert added["within"] and budgets["policy.max_seeds"]["within"]
    assert data["final"]["test_accuracy"] == summary["test_accuracy"]


def test_html_is_self_contained_with_every_plot(reported: dict[str, Any]) -> None:
    page = reported["html"]
    for forbidden in ("<script", "src=", "<link", "url(", "@import", "<iframe"):
        assert forbidden not in page, forbidden
    for plot_id in PLOT_IDS:
        assert f'<svg id="{plot_id}"' in page
    loss_svg = page[page.index('<svg id="plot-loss"'):page.index("</svg>", page.index('<svg id="plot-loss"'))]
    marked = [c for c in reported["json"]["changes"] if c["event"] in EVENT_COLORS]
    assert loss_svg.count('class="event-marker"') == len(marked) > 0
    assert 'data-kind="germinate"' in loss_svg and 'data-kind="anomaly"' in loss_svg
    grown = len(reported["json"]["kernels"])
    assert page.count('class="state-bar"') == 5 * grown  # germinated, training, blending, probation, fossilized


def test_only_the_chosen_formats_go_to_the_chosen_directory(finished: Path, tmp_path: Path) -> None:
    result = esper_report(finished, "--format", "json", "--out", tmp_path / "elsewhere")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["report.json"]
    bad = esper_report(finished, "--format", "md,pdf", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--format: unknown format pdf" in bad.stderr and "Traceback" not in bad.output


def test_a_tampered_run_still_gets_a_report_that_says_so_and_exits_4(finished: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "report")
    lines = (run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if '"germinate"' in line)
    record = json.loads(lines[index]) | {"reason": "<img src=x onerror=alert(1)> pipe | here"}
    lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    (run / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = esper_report(run)
    assert result.exit_code == 4 and f"events.jsonl:{index + 1}: record seq {index}:" in result.stderr
    page = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert "AUDIT FAILED" in page and "<img" not in page and "&lt;img src=x" in page
    data = json.loads((run / "report" / "report.json").read_text(encoding="utf-8"))
    assert not data["audit"]["ok"] and data["checkpoints"] == []
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "pipe \\| here" in md and "none: the run has no checkpoints/" in md


# --- rendering in a real browser -------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def read_png(path: Path) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows, bytes per pixel) of an 8-bit RGB/RGBA PNG: enough for a screenshot,
    without an imaging dependency."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, []
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
    assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(chunks))
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + (((line[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def test_the_html_report_renders_its_plots_in_headless_chromium(reported: dict[str, Any], tmp_path: Path) -> None:
    require_tool("Chromium (apt-get install chromium)", CHROMIUM)  # fails instead with ESPER_REQUIRE_SERVICES=1
    shot = tmp_path / "report.png"
    page = (reported["out"] / "report.html").resolve()
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page.as_uri()], capture_output=True, timeout=120, check=True,
                   env={**os.environ, "HOME": str(tmp_path)})
    width, height, rows, bpp = read_png(shot)
    assert (width, height) == (1200, 2000)

    def near(pixel: bytes, color: str) -> bool:
        target = bytes.fromhex(color.lstrip("#"))
        return all(abs(pixel[k] - target[k]) <= 24 for k in range(3))

    colors = {"train loss": SERIES_COLORS["loss"], "val loss": SERIES_COLORS["val_loss"],
              "val accuracy": SERIES_COLORS["val_accuracy"], "parameters": SERIES_COLORS["params"],
              "training state": STATE_COLORS["training"], "fossilized state": STATE_COLORS["fossilized"]}
    found: dict[str, list[int]] = {name: [] for name in colors}  # the y of every pixel of each colour
    non_white = 0
    for y, row in enumerate(rows):
        for x in range(0, width * bpp, bpp):
            pixel = row[x:x + 3]
            if pixel != b"\xff\xff\xff":
                non_white += 1
                for name, color in colors.items():
                    if near(pixel, color):
                        found[name].append(y)
    assert non_white > 0.03 * width * height, "the page rendered (almost) blank"
    for name, ys in found.items():
        assert len(ys) > 150, f"{name} ({colors[name]}): only {len(ys)} pixels drawn"
    # The plots sit in page order: loss above accuracy above parameters above the slot timeline.
    mid = {name: sorted(ys)[len(ys) // 2] for name, ys in found.items()}
    assert mid["train loss"] < mid["val accuracy"] < mid["parameters"] < mid["training state"]
