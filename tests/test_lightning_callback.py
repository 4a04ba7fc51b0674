"""The EsperGrowth callback inside lightning.Trainer on CPU (examples/lightning_callback.py, run as a
user runs it): seeds germinate, blend and are judged; fitting resumed from Lightning's own checkpoint
in a new process ends bit-identical to the uninterrupted fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lightning")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_callback.py"


def _run(cwd: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "256", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lightning_fit_grows_judges_and_resumes_bit_exactly(tmp_path: Path) -> None:
    whole = _run(tmp_path, "--out", str(tmp_path / "whole"))
    assert {"germinate", "blend", "probation"} <= set(whole["events"])
    assert {"fossilize", "cull"} & set(whole["events"]) and whole["step"] == 256 and whole["added_params"] > 0

    first = _run(tmp_path, "--out", str(tmp_path / "split"), "--stop-at", "128")
    assert first["step"] == 128 and "germinate" in first["events"]
    resumed = _run(tmp_path, "--out", str(tmp_path / "split"), "--resume")
    assert resumed["step"] == 256
    a, b = load_file(str(tmp_path / "whole" / "final.safetensors")), load_file(str(tmp_path / "split" / "final.safetensors"))
    assert a.keys() == b.keys() and any(".seeds." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
