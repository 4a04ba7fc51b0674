"""benchmarks/throughput.py end to end in its smoke size: every arm of the CPU configuration and the
language-model configuration (run on the CPU here) trains, the plain loop does the same number of
steps, and the JSON carries the figures the README quotes. No speed is asserted (benchmarks do that)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_arm_and_ends_with_the_key_figure(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--repeats", "1",
                           "--configs", "cpu-cnn,cuda-lm-bf16", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("throughput min dormant_ratio ")
    report = json.loads(out.read_text(encoding="utf-8"))
    assert not report["failures"] and [r["config"] for r in report["results"]] == ["cpu-cnn", "cuda-lm-bf16"]
    for result in report["results"]:
        assert set(result["median"]) == {"esper_dormant", "plain_host", "esper_growth", "plain_final"}
        assert all(v > 0 for v in result["median"].values())
        assert result["dormant_ratio"] == result["median"]["esper_dormant"] / result["median"]["plain_host"]
    assert report["min_dormant_ratio"] == min(r["dormant_ratio"] for r in report["results"])
