"""Checkpoint cost and resume latency.

    python benchmarks/checkpoint.py [--json PATH] [--repeats N]

* ``save_ratio``: time of a full Esper checkpoint save (tensors + JSON state + manifest, fsynced,
  renamed, LATEST updated, every step of it durable) over the durable baseline: a plain
  ``safetensors.torch.save_file`` of the same tensors followed by an fsync of that file. Measured
  interleaved in this process (ABBA order, median of N pair ratios, spread reported). Target <= 1.3.
* ``resume_s``: wall time from launching ``esper resume`` on a digits-CNN checkpoint
  (``recipes/digits-cnn.yaml``) to the first completed training step (the interpreter start and
  imports included). Target <= 2.5 s.
* ``plain_resume_s``: the floor under it, timed the same way in the same run: a plain PyTorch
  script that reads the same checkpoint's tensor file, makes the model's tensors parameters of an
  AdamW optimizer, takes one step and prints. It pays what any PyTorch resume pays (the
  interpreter, ``import torch``, and ``torch._dynamo``, which every ``torch.optim`` optimizer
  imports when it is built); ``resume_ratio`` is ``resume_s`` over it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from esper_core.checkpoints import store
from esper_core.training.run_files import checkpoint_contents
from esper_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def durable_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The baseline: what a user who needs the file to survive a crash writes by hand."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_ratio(trainer: Trainer, workdir: Path, repeats: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    tensors, state = checkpoint_contents(trainer)
    plain, esper = [], []
    for i in range(repeats):
        for arm in ("plain", "esper") if i % 2 == 0 else ("esper", "plain"):  # ABBA: no position bias
            started = time.perf_counter()
            if arm == "plain":
                durable_save_file(tensors, workdir / f"plain-{i}.safetensors")
                plain.append(time.perf_counter() - started)
            else:
                store.save(workdir / "ckpts", i, tensors, state, {"recipe_sha256": "bench"})
                esper.append(time.perf_counter() - started)
    ratios = sorted(e / p for e, p in zip(esper, plain))
    return {"save_ratio": statistics.median(ratios), "save_ratio_quartiles": statistics.quantiles(ratios, n=4),
            "save_ratio_spread": [ratios[0], ratios[-1]],
            "plain_save_ms": 1000 * statistics.median(plain), "esper_save_ms": 1000 * statistics.median(esper),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


PLAIN_RESUME = """
import sys
import torch
from safetensors.torch import load_file
tensors = load_file(sys.argv[1])
parameters = [torch.nn.Parameter(t) for name, t in tensors.items() if name.startswith("model/") and t.is_floating_point()]
optimizer = torch.optim.AdamW(parameters, lr=3e-3)
sum((p * p).sum() for p in parameters).backward()
optimizer.step()
print("step done", flush=True)
"""


def time_to_line(command: list[str], prefix: str) -> float:
    """Launch ``command`` and time until it prints a line starting with ``prefix``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(prefix):
            elapsed = time.perf_counter() - started
            process.kill()
            process.wait()
            return elapsed
    raise RuntimeError(f"{command[:4]} never printed {prefix!r}")


def resume_seconds(run_dir: Path, step: int) -> float:
    """``esper resume`` from launch to its first completed step."""
    return time_to_line([sys.executable, "-m", "esper_cli", "resume", "--checkpoint", str(run_dir),
                         "telemetry.progress=plain", f"trainer.max_steps={step + 2}"], f"step {step + 1}/")


def plain_resume_seconds(checkpoint: Path) -> float:
    """The plain PyTorch floor (see the module docstring) on the same checkpoint's tensors."""
    return time_to_line([sys.executable, "-c", PLAIN_RESUME, str(checkpoint / store.TENSORS)], "step done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--resumes", type=int, default=3, help="esper resume launches to time (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trainer = Trainer.from_recipe(ROOT / "recipes/digits-cnn.yaml",
                                      [f"run.output_dir={workdir}", "trainer.max_steps=200",
                                       "checkpoint.every_steps=199", "telemetry.progress=none",
                                       "trainer.log_every=1"])
        trainer.fit()
        figures = save_ratio(trainer, workdir, args.repeats)
        # Fixed costs (the syncs of three files, the LATEST pointer and two directories, against one
        # file's) dominate a 60 KB model; the same state with a 40 MB weight shows how the ratio
        # behaves when tensor bytes dominate.
        trainer.model.register_buffer("bench_padding", torch.zeros(10_000_000))
        large = save_ratio(trainer, workdir / "large", max(3, args.repeats // 3))
        figures["save_ratio_40mb"] = large["save_ratio"]
        figures["save_ratio_40mb_spread"] = large["save_ratio_spread"]
        runs, floors = [], []
        for _ in range(args.resumes):  # alternated, so both see the same machine load
            runs.append(resume_seconds(trainer.run_dir, 199))
            floors.append(plain_resume_seconds(trainer.run_dir / "checkpoints" / store.checkpoint_name(199)))
        figures["resume_s_runs"], figures["plain_resume_s_runs"] = runs, floors
        figures["resume_s"], figures["plain_resume_s"] = statistics.median(runs), statistics.median(floors)
        figures["resume_ratio"] = statistics.median(r / f for r, f in zip(runs, floors))
    figures["repeats"] = args.repeats
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(f"durable safetensors save (save_file + fsync) {figures['plain_save_ms']:.2f} ms, esper checkpoint "
          f"{figures['esper_save_ms']:.2f} ms ({figures['tensor_bytes']} tensor bytes); pair ratios: quartiles "
          f"{', '.join(f'{q:.2f}' for q in figures['save_ratio_quartiles'])}, "
          f"range {figures['save_ratio_spread'][0]:.2f}..{figures['save_ratio_spread'][1]:.2f}")
    print(f"save_ratio_40mb {figures['save_ratio_40mb']:.3f} (range {figures['save_ratio_40mb_spread'][0]:.2f}.."
          f"{figures['save_ratio_40mb_spread'][1]:.2f})")
    print(f"resume_s {figures['resume_s']:.2f} (runs {', '.join(f'{r:.2f}' for r in figures['resume_s_runs'])}); "
          f"plain PyTorch resume {figures['plain_resume_s']:.2f} s, resume_ratio {figures['resume_ratio']:.2f}")
    print(f"save_ratio {figures['save_ratio']:.3f}")


if __name__ == "__main__":
    main()
