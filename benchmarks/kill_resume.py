"""kill -9 at random moments, then resume: the run must always find a verified checkpoint and end with
the same weights as an uninterrupted run.

    python benchmarks/kill_resume.py --trials 200 [--json PATH]

The test suite runs the same trial function 20 times; this script is for hundreds.
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


def reference_run(workdir: Path) -> tuple[bytes, float]:
    """Final weights and training wall time of the uninterrupted run."""
    recipe = workdir / "recipe.yaml"
    recipe.write_text(RECIPE)
    subprocess.run(esper("train", str(recipe), f"run.output_dir={workdir}/ref"), check=True,
                   stdout=subprocess.DEVNULL, env=ONE_THREAD)
    summary = json.loads((workdir / "ref/kill/summary.json").read_text())
    return (workdir / "ref/kill/final/model.safetensors").read_bytes(), summary["wall_time_s"]


def trial(workdir: Path, expected: bytes, delay_s: float, index: int) -> dict:
    """Start a run, kill -9 it ``delay_s`` after training started, verify what is on disk, resume,
    compare weights.

    The resume runs in this process (through the same ``Trainer.resume`` that ``esper resume`` calls)
    to save an interpreter start per trial; the killed run is always a separate process.
    """
    import torch

    from esper_core.checkpoints import store
    from esper_core.training.trainer import Trainer

    out = workdir / f"t{index}"
    process = subprocess.Popen(esper("train", str(workdir / "recipe.yaml"), f"run.output_dir={out}"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    events = out / "kill" / "events.jsonl"
    while not events.exists() and process.poll() is None:
        time.sleep(0.01)
    time.sleep(delay_s)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = out / "kill"
    finished = (run_dir / "summary.json").exists()
    checkpoints = store.committed(run_dir / "checkpoints")
    if not finished:
        if checkpoints:
            store.find(run_dir, strict=True, warn=lambda m: None)  # the newest must verify: never partial
            with _IN_PROCESS:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    Trainer.resume(run_dir, strict=True).fit()
                finally:
                    torch.set_num_threads(threads)
        else:  # killed before the first checkpoint: nothing to resume, start again
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(esper("train", str(workdir / "recipe.yaml"), f"run.output_dir={out}"), check=True,
                           stdout=subprocess.DEVNULL, env=ONE_THREAD)
    same = (run_dir / "final/model.safetensors").read_bytes() == expected
    return {"delay_s": round(delay_s, 3), "checkpoints_at_kill": len(checkpoints), "finished_before_kill": finished,
            "identical": same}


def run_trials(trials: int, seed: int = 0, workdir: Path | None = None, parallel: int = 2) -> list[dict]:
    """``parallel`` trials at a time: the killed runs are separate processes and overlap freely."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = workdir or Path(tmp)
        expected, train_s = reference_run(base)
        delays = [rng.uniform(0.0, 1.2 * train_s) for _ in range(trials)]
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda i: trial(base, expected, delays[i], i), range(trials)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run_trials(args.trials, args.seed)
    identical = sum(r["identical"] for r in results)
    resumed = sum(1 for r in results if r["checkpoints_at_kill"] and not r["finished_before_kill"])
    if args.json:
        args.json.write_text(json.dumps({"trials": len(results), "resumed": resumed, "identical": identical,
                                         "results": results}, indent=2))
    print(f"trials {len(results)}, resumed from a checkpoint {resumed}")
    print(f"identical_final_weights {identical}/{len(results)}")


if __name__ == "__main__":
    main()
