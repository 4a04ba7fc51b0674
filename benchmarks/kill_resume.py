"""kill -9 at random moments, then resume: the run must always find a verified checkpoint, leave no
process behind, and end with the same weights as an uninterrupted run.

    python benchmarks/kill_resume.py --trials 200 [--modes random,compile,retention] [--json PATH]

Trials cycle through the modes:

- ``random``: a kill anywhere in the run (checkpoints every 3 steps, 2 kept);
- ``compile``: a kill while the background worker compiles the run's kernels (a fresh, cold
  ``storage.workspace`` per trial; the run waits for its kernels before step 1);
- ``retention``: a kill while checkpoints are written and pruned every step (``keep: 1``).

Each trial reports whether a checkpoint was lost (a ``step-*`` directory that does not verify, or a
run whose committed checkpoints no longer give a verified one), whether a process of the killed run
survived it (read from /proc), and whether the resumed run's final weights are byte-identical to
the uninterrupted run's. The test suite runs the same trial function 20 times; this script is for
hundreds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_IN_PROCESS = threading.Lock()  # training reseeds the global RNGs: one in-process resume at a time
MODES = ("random", "compile", "retention")
OVERRIDES = {"random": [], "compile": [], "retention": ["checkpoint.every_steps=1", "checkpoint.keep=1"]}

RECIPE = """\
run: {name: kill, seed: 5}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16], dropout: 0.1}
seeds: {targets: ["type:Linear"], exclude: [head], blueprints: [lowrank_adapter, wide_mlp],
        incubation_steps: 15, blend_steps: 15, probation_steps: 5, embargo_steps: 10}
policy: {trigger: periodic, period_steps: 25, growth_window: [0.1, 0.8]}
trainer: {max_steps: 100, eval_every: 10, log_every: 5}
checkpoint: {every_steps: 3, keep: 2}
telemetry: {progress: none}
"""


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""Every run of a trial uses one thread: the runs overlap, and the resumed half must do exactly the
arithmetic of the uninterrupted run (thread counts can change the order of float reductions)."""


def esper(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper_cli", *args]


def reference_run(workdir: Path) -> tuple[bytes, float, float]:
    """Final weights, training wall time and kernel compile wait of the uninterrupted run. It starts
    on a cold workspace (its compile wait is what a ``compile`` trial faces) and leaves it warm for
    the other trials, whose kill window is the training time alone."""
    recipe = workdir / "recipe.yaml"
    recipe.write_text(RECIPE)
    subprocess.run(esper("train", str(recipe), f"run.output_dir={workdir}/ref", f"storage.workspace={workdir}/ws"),
                   check=True, stdout=subprocess.DEVNULL, env=ONE_THREAD)
    summary = json.loads((workdir / "ref/kill/summary.json").read_text())
    compile_s = summary.get("kernel_wait_s", 0.0)
    weights = (workdir / "ref/kill/final/model.safetensors").read_bytes()
    return weights, summary["wall_time_s"] - compile_s, compile_s


GRACE_S = 5.0
"""How long after the kill a process of the killed run may still run before it counts as orphaned."""


def trial(workdir: Path, expected: bytes, delay_s: float, index: int, mode: str = "random",
          grace_s: float = GRACE_S) -> dict:
    """Start a run, kill -9 it ``delay_s`` after it started (see :func:`_wait_for_start`), check what is
    on disk and which of its processes survived, resume, compare weights.

    The resume runs in this process (through the same ``Trainer.resume`` that ``esper resume`` calls)
    to save an interpreter start per trial; the killed run is always a separate process.
    """
    import torch

    from esper_core.checkpoints import store
    from esper_core.errors import CheckpointError
    from esper_core.training.trainer import Trainer

    out = workdir / f"t{index}"
    workspace = out / "ws" if mode == "compile" else workdir / "ws"  # compile: cold kernels, every trial
    command = esper("train", str(workdir / "recipe.yaml"), f"run.output_dir={out}", f"storage.workspace={workspace}",
                    *OVERRIDES[mode])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    _wait_for_start(out / "kill" / "events.jsonl", process, training=mode != "compile")
    time.sleep(delay_s)
    helpers = descendants(process.pid)
    compiling = any("spawn_main" in _cmdline(pid) for pid in helpers)
    process.send_signal(signal.SIGKILL)
    process.wait()
    orphans = _survivors(helpers, grace_s)
    run_dir = out / "kill"
    finished = (run_dir / "summary.json").exists()
    checkpoints = store.committed(run_dir / "checkpoints")
    lost = [p.name for p in checkpoints if not _verifies(store, p)]
    if not finished:
        if checkpoints:
            try:
                store.find(run_dir, strict=True, warn=lambda m: None)  # the newest must verify: never partial
            except CheckpointError:
                lost.append("LATEST")
            with _IN_PROCESS:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    Trainer.resume(run_dir, strict=not lost).fit()
                finally:
                    torch.set_num_threads(threads)
        else:  # killed before the first checkpoint: nothing to resume, start again
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=ONE_THREAD)
    same = (run_dir / "final/model.safetensors").read_bytes() == expected
    return {"mode": mode, "delay_s": round(delay_s, 3), "checkpoints_at_kill": len(checkpoints),
            "finished_before_kill": finished, "killed_while_compiling": compiling, "lost_checkpoints": lost,
            "orphaned_processes": orphans, "identical": same}


def _wait_for_start(events: Path, process: subprocess.Popen[bytes], training: bool, limit_s: float = 60.0) -> None:
    """Until the run's event log exists (a compile-mode kill window starts there: the worker starts and
    compiles next) or, for the other modes, until its kernels are ready and training starts: the
    start-up before that takes longer on a loaded machine, and a window counted from the log's
    creation would then end before any checkpoint."""
    deadline = time.monotonic() + limit_s
    while process.poll() is None and time.monotonic() < deadline:
        if events.exists() and (not training or b'"kernels_ready"' in events.read_bytes()):
            return
        time.sleep(0.005)


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
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


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _survivors(helpers: set[int], grace_s: float) -> list[str]:
    """Processes of the killed run still running ``grace_s`` after the kill (then killed, so that one
    failed trial does not slow the others)."""
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in helpers if _alive(pid)]
    names = [_cmdline(pid)[:120] for pid in survivors]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return names


def _verifies(store: object, path: Path) -> bool:
    try:
        store.load(path)  # type: ignore[attr-defined]
    except Exception:  # CheckpointError: damaged; anything else would be a bug worth counting too
        return False
    return True


def run_trials(trials: int, seed: int = 0, workdir: Path | None = None, parallel: int = 2,
               modes: tuple[str, ...] = ("random",), grace_s: float = GRACE_S) -> list[dict]:
    """``parallel`` trials at a time: the killed runs are separate processes and overlap freely."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = workdir or Path(tmp)
        expected, train_s, compile_s = reference_run(base)
        plan = []
        for i in range(trials):
            mode = modes[i % len(modes)]
            window = compile_s if mode == "compile" else 1.2 * train_s
            plan.append((rng.uniform(0.0, window), mode))
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda i: trial(base, expected, plan[i][0], i, plan[i][1], grace_s), range(trials)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help="seconds after a kill before a process of "
                        "the killed run that still runs counts as orphaned")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    started = time.perf_counter()
    results = run_trials(args.trials, args.seed, parallel=args.parallel, modes=modes, grace_s=args.grace_s)
    figures = {
        "trials": len(results),
        "resumed": sum(1 for r in results if r["checkpoints_at_kill"] and not r["finished_before_kill"]),
        "killed_while_compiling": sum(r["killed_while_compiling"] for r in results),
        "lost_checkpoints": sum(len(r["lost_checkpoints"]) for r in results),
        "orphaned_processes": sum(len(r["orphaned_processes"]) for r in results),
        "identical": sum(r["identical"] for r in results),
        "by_mode": {m: sum(1 for r in results if r["mode"] == m) for m in modes},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps({**figures, "results": results}, indent=2))
    print(f"trials {figures['trials']} ({', '.join(f'{m} {n}' for m, n in figures['by_mode'].items())}), "
          f"resumed from a checkpoint {figures['resumed']}, killed while compiling {figures['killed_while_compiling']}")
    print(f"lost checkpoints {figures['lost_checkpoints']}, orphaned processes {figures['orphaned_processes']}")
    print(f"identical_final_weights {figures['identical']}/{figures['trials']}")


if __name__ == "__main__":
    main()
