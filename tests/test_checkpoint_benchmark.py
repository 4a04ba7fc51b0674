"""benchmarks/checkpoint.py runs end to end on the product's own checkpoint contents (it once broke
silently when the state capture moved) and reports the figures the README cites."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkpoint_benchmark_runs_and_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint.py"), "--repeats", "2",
                             "--resumes", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["save_ratio"] > 0 and figures["save_ratio_40mb"] > 0 and figures["resume_s"] > 0
    assert figures["plain_resume_s"] > 0 and figures["resume_ratio"] > 0
    assert figures["tensor_bytes"] > 0
    assert result.stdout.strip().splitlines()[-1].startswith("save_ratio ")  # the key figure, last
