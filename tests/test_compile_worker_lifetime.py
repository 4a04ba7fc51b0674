"""The compile worker never outlives `esper train` (issue 11 item 14), and Ctrl-C during a compile
leaves no worker traceback.

A real `python -m esper_cli train` on a recipe whose kernels are cold (a fresh storage.workspace)
compiles before step 1 (``run.deterministic``). Once the first kernel is in the store, the worker is
busy with the next one; then the parent is killed (kill -9) or the process group gets SIGINT (what a
terminal's Ctrl-C does). Processes are read from /proc (Linux).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")

RECIPE = """\
run: {{name: cold, seed: 0, device: cpu, deterministic: true, output_dir: "{root}/runs"}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [24, 20, 16]}}
seeds: {{targets: ["type:Linear"], exclude: [head], blueprints: [lowrank_adapter, wide_mlp], rank: 4}}
trainer: {{max_steps: 50}}
telemetry: {{progress: none}}
storage: {{workspace: "{root}/workspace"}}
"""
KERNELS = 6
"""Three Linear hosts of different shapes, two blueprints each."""


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped has exited: it holds no memory and runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_cold_training(tmp_path: Path) -> tuple[subprocess.Popen[bytes], set[int]]:
    """Start `esper train` in its own process group; return it once the worker is mid-compile, with
    its helper processes (the compile worker and multiprocessing's resource tracker). Output goes to
    files, not pipes: an orphaned worker would hold a pipe open and hang the test instead of failing it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path))
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "esper_cli", "train", str(recipe)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                   preexec_fn=_default_sigint)
    kernels = tmp_path / "workspace" / "kernels"
    deadline = time.monotonic() + 90
    while not any(kernels.glob("*/*/manifest.json")):  # the first kernel is stored: the worker goes on
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "no kernel was compiled"
        time.sleep(0.02)
    helpers = descendants(process.pid)
    assert any("spawn_main" in cmdline(pid) for pid in helpers), [cmdline(pid) for pid in helpers]
    return process, helpers


def test_kill_9_of_train_during_a_compile_leaves_no_process_behind(tmp_path: Path) -> None:
    process, helpers = start_cold_training(tmp_path)
    assert kernels_done(tmp_path) < KERNELS, "every kernel was compiled before the kill"
    process.kill()
    process.wait()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {pid: cmdline(pid) for pid in helpers if alive(pid)}
    for pid in survivors:  # do not leave them running for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert survivors == {}, f"orphaned after kill -9 of their parent: {survivors}"


def test_ctrl_c_during_a_compile_gives_no_worker_traceback(tmp_path: Path) -> None:
    process, helpers = start_cold_training(tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    process.wait(timeout=60)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert kernels_done(tmp_path) < KERNELS  # the compiles in flight were abandoned, not waited for
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in helpers if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def _default_sigint() -> None:
    """As in a terminal: a shell's background job (CI scripts, nohup) starts with SIGINT ignored, and
    a Python started so never sees Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kernels_done(tmp_path: Path) -> int:
    return len(list((tmp_path / "workspace" / "kernels").glob("*/*/manifest.json")))


UNGUARDED = """\
from esper_core.training.trainer import Trainer

trainer = Trainer.from_recipe("recipe.yaml", [])
trainer.fit()
"""


def test_a_script_without_a_main_guard_starts_one_run_and_is_told_why_it_got_no_kernels(tmp_path: Path) -> None:
    """Every spawned compile worker first re-runs the parent's main script. Unguarded, the script used
    to start a second run inside each worker (a second run directory); now the worker refuses with
    the advice, and the parent's kernel failures carry it too. The run itself still finishes."""
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(root=tmp_path).replace("max_steps: 50", "max_steps: 5"))
    (tmp_path / "train.py").write_text(UNGUARDED)
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cold"]  # no second run from a worker
    assert 'if __name__ == "__main__":' in done.stderr  # the worker's refusal
    events = [json.loads(line) for line in (tmp_path / "runs" / "cold" / "events.jsonl").read_text().splitlines()]
    failures = [e for e in events if e["event"] == "kernel_failed"]
    assert failures and all("re-ran an unguarded script" in e["problems"][0] for e in failures)
