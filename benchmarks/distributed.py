"""Distributed throughput: ``esper train`` on 2 ranks (DDP, growth on) against a plain PyTorch DDP loop.

    python benchmarks/distributed.py [--configs cnn,lm] [--nproc N] [--repeats R] [--json PATH] [--smoke]

This script spawns torchrun itself (``python -m torch.distributed.run --standalone --nproc-per-node N
benchmarks/distributed.py --worker ...``); run it as a plain script, not under torchrun. NCCL's
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` unless the environment says otherwise).

Per configuration, at equal per-GPU batch (``data.batch_size`` per rank, as Esper's recipes mean it):

- ``ratio``: Esper's steps/s on N ranks with growth on (the configuration's recipe from
  ``benchmarks/throughput.py``: the zoo CNN [64,128,256] at batch 256, the small transformer LM)
  over a plain DDP loop training that run's final architecture (its fossilized seeds as static
  branches, ``unwrap(load_run(run))``) on N ranks: same data shards (each rank its block of every
  global batch), AdamW and schedule, precision, compile mode, a ``loss.item()`` every ``log_every``
  steps and a validation pass (all-reduced) every ``eval_every`` steps. Esper and plain alternate,
  ABBA, over ``--repeats`` pairs; medians.
- ``scaling``: the plain loop's steps/s on N ranks over its steps/s in one process (no DDP), same
  per-GPU batch: 1.0 is perfect weak scaling.
- ``stall_s``: what a topology change costs under DDP. ``ddp_rebuild_s`` is the time Esper spent
  rebuilding the DDP wrapper (digest check included) per change, measured around the rebuild;
  ``interval_stall_s`` is, as in ``throughput.py``, the logging interval containing a seed event
  minus the median interval of its kind (median over events).

Steps/s are read on rank 0 between logged steps (where the loss is read, a synchronising point),
from the end of the warm-up fifth of the run to the end. ``--smoke`` shrinks everything (tiny models,
a few dozen steps, the CPU and gloo) so a test runs it in seconds. The last line printed is
``distributed min ratio X.XXX scaling_cnn Y.YY scaling_lm Z.ZZ stall_s S.SSS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402
from throughput import (CNN_RECIPE, LM_RECIPE, SMOKE, SMOKE_DATA, Clock, _recipe_file, _warmup,  # noqa: E402
                        plain_loss)

from esper_core import load_run  # noqa: E402
from esper_core.export.plain import unwrap  # noqa: E402
from esper_core.training.optim import lr_factor  # noqa: E402
from esper_core.training.setup import seed_everything  # noqa: E402
from esper_core.training.trainer import Trainer  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {"cnn": CNN_RECIPE, "lm": LM_RECIPE}


def _overrides(name: str, smoke: bool) -> list[str]:
    if not smoke:
        return [] if torch.cuda.is_available() else ["run.device=cpu"]
    return [*SMOKE, *SMOKE_DATA["tokens" if name == "lm" else "images"], "run.device=cpu",
            "trainer.max_steps=40", "policy.period_steps=8"]


# --- on every rank (under torchrun) ----------------------------------------------------------------

def plain_ddp_loop(reference: Trainer, model: nn.Module) -> Clock:
    """The user's own DDP loop over the recipe's data and settings (see the module docstring); rank
    ``r`` of ``W`` trains on rows ``(o * W + r) * B ...`` of each epoch's permutation, like Esper."""
    recipe = reference.loaded.recipe
    cfg, device = recipe.trainer, reference.device
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(recipe.run.seed, recipe.run.deterministic, device)
    lm = recipe.task.kind == "language_model"
    x_train, y_train = (t.to(device) for t in reference.data.train.tensors)
    x_val, y_val = (t.to(device) for t in reference.data.val.tensors)
    share = slice(rank * len(x_val) // world, (rank + 1) * len(x_val) // world)
    x_val, y_val = x_val[share], y_val[share]
    model = model.to(device).train()
    step_model = model if cfg.compile == "none" else torch.compile(model, mode=cfg.compile)
    ddp = nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    batch = recipe.data.batch_size
    per_epoch = len(x_train) // (batch * world)

    def loss_of(net: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return plain_loss(net, x, y, device, dtype, lm)

    clock = Clock()
    perm = torch.empty(0)
    for step in range(cfg.max_steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(x_train), device=device)
        start = ((step % per_epoch) * world + rank) * batch
        rows = perm[start:start + batch]
        loss = loss_of(ddp, x_train[rows], y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        done = step + 1
        if done % cfg.eval_every == 0:
            model.eval()
            with torch.no_grad():
                total = sum(loss_of(model, x_val[i:i + recipe.data.eval_batch_size],
                                    y_val[i:i + recipe.data.eval_batch_size]).float()
                            for i in range(0, len(x_val), recipe.data.eval_batch_size))
            total = torch.as_tensor(total, device=device).reshape(1)
            dist.all_reduce(total)
            model.train()
            assert math.isfinite(float(total))
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            reduced = loss.detach().float().reshape(1)
            dist.all_reduce(reduced)  # what Esper reads: the mean over the ranks
            assert math.isfinite(reduced.item())
            clock.at[done] = time.perf_counter()
    return clock


def worker(names: list[str], repeats: int, smoke: bool, work: Path, out: Path) -> None:
    """Every rank: Esper with growth and the plain DDP loop, ABBA; rank 0 writes the figures."""
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() and not smoke \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            **({"device_id": device} if device.type == "cuda" else {}))
    leader = dist.get_rank() == 0
    results = []
    for name in names:
        recipe = _recipe_file(CONFIGS[name], work) if leader else work / f"{CONFIGS[name]['run']['name']}.yaml"
        dist.barrier()
        overrides = _overrides(name, smoke)
        reference = Trainer.from_recipe(recipe, [f"run.output_dir={work / 'unused'}", *overrides])
        cfg = reference.loaded.recipe.trainer
        warmup = _warmup(cfg)
        rates: dict[str, list[float]] = {"esper": [], "plain": []}
        rebuild: list[float] = []
        stalls: list[float] = []
        grown: Path | None = None

        def esper(repeat: int) -> None:
            nonlocal grown
            trainer, summary, clock = throughput.run_esper(recipe, overrides, work / f"{name}-{repeat}")
            grown = Path(summary["run_dir"])
            assert trainer.replica is not None
            if trainer.replica.rebuilds > 1:
                rebuild.append(trainer.replica.stall_s / (trainer.replica.rebuilds - 1))
            if leader:
                rates["esper"].append(clock.rate(warmup, cfg.max_steps))
                stalls.extend(clock.stalls(cfg.eval_every, warmup))

        def plain() -> None:
            assert grown is not None
            clock = plain_ddp_loop(reference, unwrap(load_run(grown))[0])
            if leader:
                rates["plain"].append(clock.rate(warmup, cfg.max_steps))

        for repeat in range(repeats):
            (esper(repeat), plain()) if repeat % 2 == 0 else (plain(), esper(repeat))
        if leader:
            med = {k: statistics.median(v) for k, v in rates.items()}
            results.append({"config": name, "overrides": overrides, "world_size": dist.get_world_size(),
                            "steps": cfg.max_steps, "warmup_steps": warmup, "steps_per_s": rates, "median": med,
                            "ratio": med["esper"] / med["plain"], "final_run": str(grown),
                            "ddp_rebuild_s": statistics.median(rebuild) if rebuild else None,
                            "interval_stall_s": statistics.median(stalls) if stalls else None})
    if leader:
        out.write_text(json.dumps(results), encoding="utf-8")
    dist.destroy_process_group()


# --- the coordinator -------------------------------------------------------------------------------

def single_process_plain(result: dict[str, Any], work: Path, repeats: int) -> float:
    """The plain loop's median steps/s in one process (no DDP) on the same final architecture."""
    name = result["config"]
    recipe = work / f"{CONFIGS[name]['run']['name']}.yaml"
    reference = Trainer.from_recipe(recipe, [f"run.output_dir={work / 'unused'}", *result["overrides"]])
    cfg = reference.loaded.recipe.trainer
    model = unwrap(load_run(Path(result["final_run"])))[0]
    rates = []
    for _ in range(repeats):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rates.append(throughput.plain_loop(reference, model).rate(result["warmup_steps"], cfg.max_steps))
        model.load_state_dict(state)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="cnn,lm", help="comma-separated: cnn, lm (default both)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU with gloo (for tests)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set by the coordinator for torchrun
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.worker is not None:
        worker(names, args.repeats, args.smoke, args.work, args.worker)
        return 0
    if args.smoke:
        args.repeats = min(args.repeats, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if not torch.cuda.is_available() or args.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # the single-process loop like each rank
    with tempfile.TemporaryDirectory(prefix="esper-distributed-") as tmp:
        work = Path(tmp)
        figures = work / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   str(Path(__file__).resolve()), "--configs", args.configs, "--repeats", str(args.repeats),
                   "--worker", str(figures), "--work", str(work), *(["--smoke"] if args.smoke else [])]
        launched = subprocess.run(command, env=env)
        if launched.returncode != 0:
            print(f"distributed: torchrun exited {launched.returncode}", file=sys.stderr)
            return 1
        results = json.loads(figures.read_text(encoding="utf-8"))
        for result in results:
            one = single_process_plain(result, work, args.repeats)
            result["plain_single_steps_per_s"] = one
            result["scaling"] = result["median"]["plain"] / one
            print(f"{result['config']}: ratio {result['ratio']:.3f} scaling {result['scaling']:.2f} steps/s "
                  f"{json.dumps({k: round(v, 1) for k, v in result['median'].items()})} single {one:.1f} "
                  f"ddp_rebuild_s {result['ddp_rebuild_s']} interval_stall_s {result['interval_stall_s']}", flush=True)
    stalls = [r["ddp_rebuild_s"] for r in results if r["ddp_rebuild_s"] is not None]
    report = {"benchmark": "distributed", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "python": platform.python_version(), "nproc": args.nproc, "smoke": args.smoke,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
              "results": results, "min_ratio": min(r["ratio"] for r in results),
              "max_ddp_rebuild_s": max(stalls) if stalls else None}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    scaling = " ".join(f"scaling_{r['config']} {r['scaling']:.2f}" for r in results)
    stall = report["max_ddp_rebuild_s"]
    print(f"distributed min ratio {report['min_ratio']:.3f} {scaling} stall_s "
          + ("n/a" if stall is None else f"{stall:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
