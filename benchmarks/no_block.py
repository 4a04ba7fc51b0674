"""Compilation never blocks training: a run whose kernels are all cold, against the same run warm.

    python benchmarks/no_block.py [--json PATH] [--steps N]

Both runs use the digits CNN (``recipes/digits-cnn.yaml``) with ``run.deterministic=false`` (seeds
wait GERMINATED for their kernels instead of the run waiting before step 1) and a periodic trigger
early in training, so germinations ask for kernels while the background worker is still compiling
them. The cold run starts from an empty workspace; the warm run reuses the kernels the cold run
stored. Every training step is timed; the script reports step-time p50/p99 of each run, their p99
ratio, how many steps waited on a compile (``blocked_steps``) and how many steps germinated seeds
waited for their kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from esper_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def timed_run(workspace: Path, out: Path, steps: int) -> dict:
    trainer = Trainer.from_recipe(ROOT / "recipes/digits-cnn.yaml", [
        f"run.output_dir={out}", f"storage.workspace={workspace}", "run.deterministic=false",
        f"trainer.max_steps={steps}", "policy.trigger=periodic", "policy.period_steps=40",
        "policy.growth_window=[0.02,0.7]", "trainer.eval_every=20", "telemetry.progress=none"])
    durations: list[float] = []
    step = trainer._train_step

    def timed_step():  # the benchmark's own instrument around the real training step
        started = time.perf_counter()
        result = step()
        durations.append(time.perf_counter() - started)
        return result

    trainer._train_step = timed_step  # type: ignore[method-assign]
    summary = trainer.fit()
    events = [json.loads(line) for line in (trainer.run_dir / "events.jsonl").read_text().splitlines()]
    germinated: dict[tuple[str, int], int] = {}
    waits = []
    for e in events:  # pair each incubation with the germination of the same slot before it
        if e["event"] == "germinate":
            germinated[(e["layer"], e["slot"])] = e["step"]
        elif e["event"] == "incubate" and (e["layer"], e["slot"]) in germinated:
            waits.append(e["step"] - germinated.pop((e["layer"], e["slot"])))
    ordered = sorted(durations[5:])  # the first steps pay one-off allocator and thread start-up costs
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "blocked_steps": summary["blocked_steps"], "germinations": len(waits),
            "germination_wait_steps": waits, "kernels_compiled": len(list((workspace / "kernels").rglob("manifest.json")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "workspace"
        cold = timed_run(workspace, Path(tmp) / "cold", args.steps)
        warm = timed_run(workspace, Path(tmp) / "warm", args.steps)
    figures = {"blocked_steps": cold["blocked_steps"] + warm["blocked_steps"],
               "p99_ratio": cold["p99_ms"] / warm["p99_ms"], "cold": cold, "warm": warm, "steps": args.steps}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    for name, run in (("cold (background compiles)", cold), ("warm (all kernels stored)", warm)):
        print(f"{name:28s} p50 {run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  blocked steps {run['blocked_steps']}  "
              f"germinations {run['germinations']} waited {run['germination_wait_steps']} steps")
    print(f"blocked_steps {figures['blocked_steps']}")
    print(f"p99_ratio {figures['p99_ratio']:.3f}")


if __name__ == "__main__":
    main()
