"""The growth controller in a plain PyTorch loop (examples/own_loop.py, run as a user runs it): the
user's own model, AdamW, loss and loop; seeds germinate, blend and are judged; a checkpoint written
mid-run by one process is resumed by another and ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


def _run(cwd: Path, *args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "240", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_own_loop_grows_judges_and_resumes_bit_exactly_in_a_new_process(tmp_path: Path) -> None:
    events, whole = _run(tmp_path, "--out", str(tmp_path / "whole"))
    kinds = {line.split()[2] for line in events}
    assert {"germinate", "blend"} <= kinds and kinds & {"fossilize", "cull"}, events
    assert whole["added_params"] > 0 and whole["val_accuracy"] > 0.3

    _run(tmp_path, "--out", str(tmp_path / "split"), "--checkpoint-every", "120", "--stop-at", "120")
    assert (tmp_path / "split" / "checkpoints" / "step-00000120").is_dir()
    _, resumed = _run(tmp_path, "--out", str(tmp_path / "split"), "--resume")
    a, b = load_file(str(tmp_path / "whole" / "final.safetensors")), load_file(str(tmp_path / "split" / "final.safetensors"))
    assert a.keys() == b.keys() and any(".seeds." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert {k: resumed[k] for k in ("val_accuracy", "params", "added_params")} == \
        {k: whole[k] for k in ("val_accuracy", "params", "added_params")}
