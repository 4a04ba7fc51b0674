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
    assert names == {"report.md", "report.html", "report.json"}  # the plots live inside the files
    assert all(f"wrote {reported['out'] / n}" in reported["result"].stdout for n in ("report.json", "report.md"))


def test_markdown_embeds_every_plot_inline(reported: dict[str, Any]) -> None:
    md = reported["md"]
    assert "![" not in md and ".svg)" not in md
    for plot_id in PLOT_IDS:
        start = md.index(f'<svg id="{plot_id}"')
        block = md[start:md.index("</svg>", start)]
        assert "\n\n" not in block  # a blank line would end the Markdown HTML block mid-plot
        assert md[:start].endswith("\n\n")


def test_identity_names_the_recipe_software_data_device_and_times(finished: Path, reported: dict[str, Any]) -> None:
    run = reported["json"]["run"]
    assert run["recipe_sha256"] == (finished / "recipe.sha256").read_text(encoding="utf-8").strip()
    assert run["versions"]["torch_version"] == torch.__version__ and run["versions"]["esper_version"]
    assert run["data"]["source"] == "digits" and run["device"] == "cpu" and run["steps"] == 160
    assert run["started_at"] and run["ended_at"] and run["started_at"] <= run["ended_at"]
    assert reported["json"]["audit"]["ok"] and reported["json"]["audit"]["recipe_ok"]
    assert "audit passed" in reported["md"].splitlines()[0]


def test_a_run_naming_no_code_says_there_was_none_to_check(reported: dict[str, Any]) -> None:
    """The digits run's recipe names no factory: the report says what it recorded, not that code matched."""
    code = reported["json"]["code"]
    assert code["modules"] == [] and code["recorded_in"] == "final/manifest.json"
    assert code["detail"] == ("no code of the user's recorded in final/manifest.json, which run_end binds: the "
                              "recipe names no module, or only standard-library or installed ones")
    assert f"| factory code | {code['detail']} |" in reported["md"]
    assert "## Factory code" in reported["md"]


def test_final_metrics_show_the_metric_with_every_seed_muted_beside_it(finished: Path,
                                                                       reported: dict[str, Any]) -> None:
    summary = json.loads((finished / "summary.json").read_text(encoding="utf-8"))
    final = reported["json"]["final"]
    assert final["seeds_muted"] == {k: summary["seeds_muted"][k] for k in ("val_accuracy", "test_accuracy")}
    for split in ("val", "test"):
        row = f"| {split} accuracy with every seed muted | {summary['seeds_muted'][f'{split}_accuracy']:.4g} |"
        assert row in reported["md"], row
        assert f"{split} accuracy with every seed muted" in reported["html"]


NOTHING_KEPT = [("max_seeds: 4", "max_seeds: 0"), ("fossilize_margin: -1.0", "fossilize_margin: 1.0")]
"""Recipe changes after which no seed contributes to the final model: a static run, every seed culled."""


@pytest.mark.parametrize("change", NOTHING_KEPT, ids=["static", "every-seed-culled"])
def test_a_run_no_seed_contributes_to_has_no_muted_rows(change: tuple[str, str], tmp_path: Path) -> None:
    """A static run's summary still holds seeds_muted, the unmuted figures again (nothing to mute), and
    the report listed them "with every seed muted" as if growth had been measured."""
    recipe = RECIPE.replace(*change) + f'storage: {{workspace: "{tmp_path / "ws"}"}}\n'
    run = finished_run(tmp_path, recipe)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["seeds_muted"]["test_accuracy"] == summary["test_accuracy"]
    assert not any(summary["seeds"][state] for state in ("blending", "probation", "fossilized"))
    assert (summary["seeds"]["culled"] > 0) == ("fossilize_margin" in change[0])  # that one grew, then culled
    result = esper_report(run)
    assert result.exit_code == 0, result.output
    out = run / "report"
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["final"]["seeds_muted"] is None
    for page in ("report.md", "report.html"):
        text = (out / page).read_text(encoding="utf-8")
        assert "test accuracy" in text and "muted" not in text, page


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
        assert f"gain {c['metric_gain']:.4g}" in c["detail"] and "kept" in c["detail"]
        assert {"metric", "metric_with", "metric_without", "stderr", "samples", "upper_bound", "margin",
                "val_loss_with", "val_loss_without", "rule"} <= set(c)
        assert c["metric"] == "accuracy" and c["samples"] > 0
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


def test_links_planted_in_a_run_s_report_directory_are_never_written_through(finished: Path, tmp_path: Path) -> None:
    """A run directory may come from someone else: a report/report.md linked to a file of the user's
    was overwritten with the report, and a report/ linked to another directory received the files."""
    run = Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    shutil.rmtree(run / "report", ignore_errors=True)
    (run / "report").mkdir()
    (run / "report" / "report.md").symlink_to(victim)
    assert esper_report(run).exit_code == 0
    assert victim.read_text() == "the user's file\n" and not (run / "report" / "report.md").is_symlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / "report")
    (run / "report").symlink_to(elsewhere, target_is_directory=True)
    result = esper_report(run)
    assert result.exit_code == 2 and "report: a symbolic link" in result.stderr and "Traceback" not in result.output
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("planted, where, message", [
    ("file", "report", "a regular file in place of the report's directory"),
    ("directory", "report/report.md", "a directory in place of the report file"),
    ("out-file", "elsewhere", "a regular file in place of the report's directory"),
])
def test_something_in_place_of_the_report_s_directory_or_a_file_of_it_is_one_located_error(
        finished: Path, tmp_path: Path, planted: str, where: str, message: str) -> None:
    """A file where report/ (or --out) belongs, or a directory where report.md belongs, ended in a
    FileExistsError or IsADirectoryError traceback: it is one line naming it, exit 2, and left as it was."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(run / "report", ignore_errors=True)
    target = (tmp_path if planted == "out-file" else run) / where
    if planted == "directory":
        (target / "inside").mkdir(parents=True)
    else:
        target.write_text("someone's file\n")
    result = esper_report(run, *(["--out", target] if planted == "out-file" else []))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {target}: {message}: remove it, or write the report elsewhere with --out DIR"], \
        result.stderr
    assert (target / "inside").is_dir() if planted == "directory" else target.read_text() == "someone's file\n"


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

def screenshot(page: Path, tmp_path: Path, height: int) -> tuple[int, int, list[bytes], int]:
    """Render ``page`` in headless Chromium, 1200 px wide, and read the PNG back."""
    shot = tmp_path / f"{page.stem}.png"
    subprocess.run([require_tool("chromium", "chromium-browser", "google-chrome", package="chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size=1200,{height}",
                    page.resolve().as_uri()], capture_output=True, timeout=120, check=True,
                   env={**os.environ, "HOME": str(tmp_path)})
    return read_png(shot)


def rows_with(rows: list[bytes], bpp: int, colors: dict[str, str]) -> dict[str, list[int]]:
    """For each named colour, the y of every pixel (within 24 per channel) of that colour."""
    targets = {name: bytes.fromhex(color.lstrip("#")) for name, color in colors.items()}
    found: dict[str, list[int]] = {name: [] for name in colors}
    for y, row in enumerate(rows):
        for x in range(0, len(row), bpp):
            pixel = row[x:x + 3]
            if pixel == b"\xff\xff\xff":
                continue
            for name, target in targets.items():
                if all(abs(pixel[k] - target[k]) <= 24 for k in range(3)):
                    found[name].append(y)
    return found


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
    width, height, rows, bpp = screenshot(reported["out"] / "report.html", tmp_path, 2000)
    assert (width, height) == (1200, 2000)
    non_white = sum(1 for row in rows for x in range(0, len(row), bpp) if row[x:x + 3] != b"\xff\xff\xff")
    assert non_white > 0.03 * width * height, "the page rendered (almost) blank"
    colors = {"train loss": SERIES_COLORS["loss"], "val loss": SERIES_COLORS["val_loss"],
              "val accuracy": SERIES_COLORS["val_metric"], "parameters": SERIES_COLORS["params"],
              "training state": STATE_COLORS["training"], "fossilized state": STATE_COLORS["fossilized"]}
    found = rows_with(rows, bpp, colors)
    for name, ys in found.items():
        assert len(ys) > 150, f"{name} ({colors[name]}): only {len(ys)} pixels drawn"
    # The plots sit in page order: loss above accuracy above parameters above the slot timeline.
    mid = {name: sorted(ys)[len(ys) // 2] for name, ys in found.items()}
    assert mid["train loss"] < mid["val accuracy"] < mid["parameters"] < mid["training state"]


# --- log axis, labels, stacked markers, responsive width ---------------------------------------------

def _svg(page: str, svg_id: str) -> str:
    start = page.index(f'<svg id="{svg_id}"')
    return page[start:page.index("</svg>", start) + len("</svg>")]


def test_loss_axis_is_logarithmic_by_default_and_linear_on_request(finished: Path, reported: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    import math
    import re

    loss = _svg(reported["html"], "plot-loss")
    assert ">loss (log scale)</text>" in loss
    ticks = [float(t.replace(",", "")) for t in re.findall(r'text-anchor="end">([0-9.,e+-]+)</text>', loss)]
    assert len(ticks) >= 2
    for tick in ticks:  # 1, 2 or 5 times a power of ten
        mantissa = tick / 10 ** math.floor(math.log10(tick))
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6, ticks
    result = esper_report(finished, "--loss-scale", "linear", "--format", "html", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    linear = _svg((tmp_path / "report.html").read_text(encoding="utf-8"), "plot-loss")
    assert ">loss</text>" in linear and "log scale" not in linear
    bad = esper_report(finished, "--loss-scale", "cubic", "--out", tmp_path)
    assert bad.exit_code == 2 and "--loss-scale: unknown scale cubic" in bad.stderr


def test_every_plot_scales_to_its_container_and_labels_both_axes(reported: dict[str, Any]) -> None:
    import re

    for plot_id in PLOT_IDS:
        svg = _svg(reported["html"], plot_id)
        opening = svg[:svg.index(">")]
        assert 'width="100%"' in opening and re.search(r'viewBox="0 0 1000 \d+"', opening), opening
        assert 'height="' not in opening
        assert svg.count('class="axis-label"') == 1 and ">step</text>" in svg


def test_markers_at_one_step_are_stacked_each_with_its_own_title() -> None:
    import re

    from esper_core.telemetry.report.svg import MARKER_SIZE, Marker, Series, line_chart

    markers = [Marker(100.0, kind, "#123456", f"step 100: {kind}") for kind in ("germinate", "blend", "checkpoint")]
    markers += [Marker(101.0, "cull", "#654321", "step 101: cull"), Marker(900.0, "fossilize", "#0000ff", "far")]
    svg = line_chart("t", "t", [Series("loss", [(0.0, 2.0), (1000.0, 0.1)], "#000000")], markers, (0.0, 1000.0),
                     y_label="loss", log_y=True)
    groups = re.findall(r'<g class="event-marker".*?</g>', svg)
    assert len(groups) == 5
    titles = [re.search(r"<title>(.*?)</title>", g).group(1) for g in groups]
    assert sorted(titles) == sorted(m.title for m in markers)
    boxes = [tuple(float(v) for v in re.search(r'<rect x="([\d.]+)" y="([\d.]+)"', g).groups()) for g in groups]
    for i, (x1, y1) in enumerate(boxes):
        for x2, y2 in boxes[i + 1:]:
            assert abs(x1 - x2) >= MARKER_SIZE or abs(y1 - y2) >= MARKER_SIZE, (boxes, titles)
    assert len({y for x, y in boxes if abs(x - boxes[0][0]) < MARKER_SIZE}) == 4  # one column of four


def test_no_marker_of_the_real_run_hides_another(reported: dict[str, Any]) -> None:
    import re

    from esper_core.telemetry.report.svg import MARKER_SIZE

    for plot_id in ("plot-loss", "plot-metric", "plot-params"):
        svg = _svg(reported["html"], plot_id)
        boxes = [tuple(float(v) for v in m) for m in re.findall(r'class="event-marker".*?<rect x="([\d.]+)" '
                                                                r'y="([\d.]+)"', svg)]
        assert boxes
        for i, (x1, y1) in enumerate(boxes):
            assert all(abs(x1 - x2) >= MARKER_SIZE or abs(y1 - y2) >= MARKER_SIZE for x2, y2 in boxes[i + 1:])


CUSTOM_RECIPE = """\
run: {{name: custom, seed: 0, device: cpu}}
task: {{kind: custom, function: 'factories:smooth_l1_logits_loss'}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
policy: {{max_seeds: 0}}
trainer: {{max_steps: 20, eval_every: 10}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""


def test_a_custom_task_s_loss_is_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom task's metric is its loss: the final metrics (and a comparison's) listed val and test loss twice."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the loss function is in tests/factories.py
    run = finished_run(tmp_path, CUSTOM_RECIPE.format(workspace=tmp_path / "ws"))
    for runs, page in (([run], run / "report" / "report.md"),
                       ([run, run], run / "report" / "vs-custom" / "comparison.md")):
        result = esper_report(*runs, "--format", "md")
        assert result.exit_code == 0, result.output
        rows = [line.split("|")[1].strip() for line in page.read_text(encoding="utf-8").splitlines()
                if line.startswith("| ")]
        assert rows.count("val loss") == 1 and rows.count("test loss") == 1, rows


# --- two runs side by side ----------------------------------------------------------------------------

PUSH_SECRET = "hunter2-report"


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run of the same recipe with another seed and learning rate, pushing its metrics to a
    Pushgateway URL with a password (nothing listens there: a failed push never fails the run)."""
    changed = RECIPE.replace("seed: 0", "seed: 1").replace("lr: 0.01", "lr: 0.02").replace(
        "progress: none,", f"progress: none, pushgateway_url: 'http://esper:{PUSH_SECRET}@127.0.0.1:9',")
    return finished_run(tmp_path_factory.mktemp("second"), changed)


@pytest.fixture(scope="module")
def compared(finished: Path, second: Path) -> dict[str, Any]:
    result = esper_report(finished, second)
    assert result.exit_code == 0, result.output
    out = finished / "report" / f"vs-{second.name}"
    return {"result": result, "out": out,
            "json": json.loads((out / "comparison.json").read_text(encoding="utf-8")),
            "html": (out / "comparison.html").read_text(encoding="utf-8"),
            "md": (out / "comparison.md").read_text(encoding="utf-8")}


def test_comparison_puts_metrics_seeds_and_settings_side_by_side(finished: Path, second: Path,
                                                                   compared: dict[str, Any]) -> None:
    data = compared["json"]
    assert sorted(p.name for p in compared["out"].iterdir()) == ["comparison.html", "comparison.json", "comparison.md"]
    summaries = [json.loads((run / "summary.json").read_text(encoding="utf-8")) for run in (finished, second)]
    metrics = {m["metric"]: m for m in data["metrics"]}
    for key in ("val_accuracy", "test_accuracy", "params_final"):
        assert (metrics[key]["A"], metrics[key]["B"]) == (summaries[0][key], summaries[1][key])
        assert metrics[key]["difference"] == pytest.approx(summaries[1][key] - summaries[0][key])
    differences = {d["key"]: (d["A"], d["B"]) for d in data["recipe_differences"]}
    assert differences["run.seed"] == (0, 1) and differences["trainer.lr"] == (0.01, 0.02)
    assert "trainer.max_steps" not in differences
    seeds = {s["state"]: (s["A"], s["B"]) for s in data["seeds"]}
    assert seeds == {state: (summaries[0]["seeds"].get(state, 0), summaries[1]["seeds"].get(state, 0))
                     for state in set(summaries[0]["seeds"]) | set(summaries[1]["seeds"])}
    grown = [sum(1 for e in events_of(run) if e["event"] == "germinate") for run in (finished, second)]
    assert [sum(k[label] for k in data["kernels"]) for label in ("A", "B")] == grown
    assert [r["label"] for r in data["runs"]] == [f"A ({finished.name})", f"B ({second.name})"]
    for label, run in zip(("A", "B"), (finished, second)):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        assert data["series"][label]["loss"] == [[r["step"], r["loss"]] for r in rows if "loss" in r]
    assert "trainer.lr" in compared["md"] and f"B ({second.name})" in compared["md"].splitlines()[0]
    # a setting that holds a secret is listed as differing, but the secret is in no part of the comparison
    assert differences["telemetry.pushgateway_url"] == (None, "http://esper:***@127.0.0.1:9")
    assert PUSH_SECRET in (second / "recipe.yaml").read_text(encoding="utf-8")
    assert not any(PUSH_SECRET in text for text in (json.dumps(data), compared["html"], compared["md"],
                                                    compared["result"].output))


def test_comparison_overlays_both_runs_curves_inline(compared: dict[str, Any]) -> None:
    for document in (compared["html"], compared["md"]):
        for plot_id in ("compare-loss", "compare-metric", "compare-params"):
            svg = _svg(document, plot_id)
            assert svg.count('class="series"') >= 2
            assert "A (" in svg and "B (" in svg
    loss = _svg(compared["html"], "compare-loss")
    assert loss.count('class="series"') == 4 and ">loss (log scale)</text>" in loss
    for forbidden in ("<script", "src=", "<link", "url(", "@import"):
        assert forbidden not in compared["html"]


def test_the_comparison_renders_both_runs_in_headless_chromium(compared: dict[str, Any], tmp_path: Path) -> None:
    from esper_core.telemetry.report.plots import RUN_COLORS

    width, height, rows, bpp = screenshot(compared["out"] / "comparison.html", tmp_path, 1600)
    assert (width, height) == (1200, 1600)
    found = rows_with(rows, bpp, {"A": RUN_COLORS[0], "B": RUN_COLORS[1]})
    for name, ys in found.items():
        assert len(ys) > 300, f"run {name}: only {len(ys)} pixels of its colour drawn"
    # Each run's colour shows in all three plots: its pixels spread over most of the plots' height.
    for ys in found.values():
        assert max(ys) - min(ys) > 600


def test_report_refuses_three_runs_and_json_without_verify(finished: Path, second: Path) -> None:
    three = esper_report(finished, second, finished)
    assert three.exit_code == 2 and "RUN: 3 run directories given" in three.stderr
    json_only = esper_report(finished, "--json")
    assert json_only.exit_code == 2 and "--json: --json applies to --verify" in json_only.stderr


def test_verify_json_reports_each_run_and_exits_4_on_tampering(finished: Path, second: Path, tmp_path: Path) -> None:
    ok = esper_report("--verify", "--json", finished, second)
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["ok"] and [r["run"] for r in data["runs"]] == [str(finished), str(second)]
    assert all(r["ok"] and r["events"]["records"] > 0 and not r["problems"] for r in data["runs"])  # recipe checks included
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    lines = (run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    del lines[3]
    (run / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bad = esper_report("--verify", "--json", run)
    assert bad.exit_code == 4
    data = json.loads(bad.stdout)
    assert not data["ok"] and not data["runs"][0]["events"]["ok"]
    assert data["runs"][0]["problems"] and data["runs"][0]["problems"][0] in bad.stderr


@pytest.mark.parametrize("seeds", [{"training": 2, "dormant": 2}, {"fossilized": 1}, {"blending": 1}, {"culled": 3},
                                   {}])
def test_the_terminal_summary_and_the_report_agree_when_growth_was_measured(seeds: dict[str, int]) -> None:
    """"Every seed muted" is shown by `esper train`'s table and by the report for the same runs: those
    ending with a seed whose output the model adds (an incubating seed adds exactly zero)."""
    from esper_cli.train import _muted_rows
    from esper_core.telemetry.report.content import _muted

    summary = {"seeds": seeds, "seeds_muted": {"val_accuracy": 0.5, "test_accuracy": 0.4}}
    adds = bool({"blending", "probation", "fossilized"} & {k for k, v in seeds.items() if v})
    assert bool(_muted_rows(summary, "accuracy")) is adds
    assert (_muted(summary["seeds_muted"], seeds, "accuracy") is not None) is adds
