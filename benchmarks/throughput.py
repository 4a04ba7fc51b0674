"""Throughput: ``esper train`` against a plain PyTorch loop doing the same work, in one process.

    python benchmarks/throughput.py [--configs cpu-cnn,cuda-cnn-fp32,...] [--repeats R] [--steps N] [--json PATH]

Two figures per configuration (issue 13):

- ``dormant_ratio``: Esper with growth disabled (``policy.max_seeds=0``: every targeted layer wrapped,
  nothing can grow, so no kernel is compiled and no health is measured) against the plain loop on the
  host model;
- ``trainer_ratio``: Esper with growth on (the configuration's recipe) against the plain loop training
  that run's final architecture from the start (its fossilized seeds as static branches, built by
  ``unwrap(load_run(run))``), so both sides do comparable arithmetic.

The plain loop is what a performance-minded user writes: the same data splits (built by Esper from
the same recipe) held on the device, one ``randperm`` per epoch and one indexing op per batch, the
same model, AdamW with the same kernel (fused on the CPU, as Esper builds it) and the same
learning-rate schedule (``LambdaLR``), the same precision
(``torch.autocast``) and ``torch.compile`` mode, the same determinism setting, a ``loss.item()`` every
``log_every`` steps and a validation pass every ``eval_every`` steps. Esper's run is a real
``Trainer.fit()`` (checkpoints off on both sides; their cost is ``benchmarks/checkpoint.py``'s).

Steps per second are taken over the same window on both sides: from the end of step ``warmup`` (the
first steps carry one-off costs: allocator, cuDNN autotuning, compilation) to the end of the last
step, both read at a host-device synchronising point (the logged loss). Each Esper arm and its plain
counterpart run back to back, in ABBA order over ``--repeats`` pairs; the ratio is of the median
steps/s.

Compiled configurations reset dynamo before every arm: arms share the model classes' code objects,
whose compiled entries would otherwise pile up across arms up to ``recompile_limit`` (after which
dynamo runs a frame eagerly), slowing whichever arm comes later; a user's run has its process to
itself.

``topology_stall_s``: for every seed event that changes what a forward pass runs (a seed's module
added, fossilized, merged or culled), the time of the logging interval that contains it, and of the
one that holds the next step (the first pass of the new topology, which is where a compile on the
training thread lands) if that is another, each minus the median interval of the same kind (with or
without a validation pass); the median over events is reported (issue target under
``trainer.compile: default`` on CUDA: <= 1.0 s).

Configurations: ``cpu-quickstart`` (``recipes/quickstart.yaml``, the MLP whose span seeds widen it, on
the CPU), ``cpu-cnn`` (``recipes/digits-cnn.yaml``, the quickstart until 2026-12-01),
``cpu-cnn-compiled`` (the zoo CNN with channels [16, 32, 64] on 16x16 images, batch 64, 400 steps,
``trainer.compile: default``; inductor's first compile makes it a few minutes), ``cuda-cnn-fp32``, ``cuda-cnn-bf16``,
``cuda-cnn-compiled`` (the zoo CNN with channels [64, 128, 256], batch 256, generated 3x32x32 images),
``cuda-cnn-compiled-nondet`` (the same with ``run.deterministic: false`` on both sides: Esper then
compiles each new topology on a background thread instead of only the dormant and the grown model
on the training thread),
``cuda-lm-fp32``, ``cuda-lm-bf16`` (the zoo transformer, 4 blocks of width 256, 64 sequences of 256
tokens). ``--smoke`` shrinks every configuration to a few steps (for the test suite). ``--steps N``
lengthens every configuration's run to ``N`` steps with its growth at the same steps and the same
timed window (see :func:`_longer`): a supplementary figure, not the issue's. The last line
printed is ``throughput min dormant_ratio X.XXX min trainer_ratio Y.YYY``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # throughput_data, for the recipes' data.factory

from esper_core import load_run  # noqa: E402
from esper_core.export.plain import unwrap  # noqa: E402
from esper_core.recipe.load import load_recipe  # noqa: E402
from esper_core.training.models import build_model  # noqa: E402
from esper_core.training.optim import cpu_fused  # noqa: E402
from esper_core.training.schedules import lr_factor  # noqa: E402
from esper_core.training.setup import seed_everything  # noqa: E402
from esper_core.training.trainer import Trainer  # noqa: E402

TOPOLOGY_EVENTS = ("incubate", "fossilize", "cull", "rollback")
"""Seed events after which a forward pass runs different modules (germinate only reserves a slot)."""

CNN_RECIPE: dict[str, Any] = {
    "run": {"name": "cnn", "seed": 0, "device": "cuda"},
    "data": {"source": "factory", "factory": "throughput_data:images", "batch_size": 256, "eval_batch_size": 1024},
    "model": {"arch": "cnn", "channels": [64, 128, 256]},
    "seeds": {"targets": ["blocks.*.conv*"], "blueprints": ["residual_conv", "dwsep_conv", "se_gate"], "rank": 16,
              "incubation_steps": 100, "blend_steps": 100, "probation_steps": 50},
    "policy": {"trigger": "periodic", "period_steps": 100, "growth_window": [0.05, 0.6], "max_seeds": 4},
    "trainer": {"max_steps": 1000, "lr": 0.002, "eval_every": 100, "log_every": 25},
}
LM_RECIPE: dict[str, Any] = {
    "run": {"name": "lm", "seed": 0, "device": "cuda"},
    "task": {"kind": "language_model"},
    "data": {"source": "factory", "factory": "throughput_data:tokens", "batch_size": 64, "eval_batch_size": 128},
    "model": {"arch": "transformer", "d_model": 256, "n_layers": 4, "n_heads": 4},
    "seeds": {"targets": ["blocks.*.mlp.*"], "blueprints": ["wide_mlp"], "rank": 32,
              "incubation_steps": 100, "blend_steps": 100, "probation_steps": 50},
    "policy": {"trigger": "periodic", "period_steps": 100, "growth_window": [0.05, 0.6], "max_seeds": 4},
    "trainer": {"max_steps": 1000, "lr": 0.001, "eval_every": 100, "log_every": 25},
}
CONFIGS: dict[str, tuple[Any, list[str]]] = {
    "cpu-quickstart": (ROOT / "recipes" / "quickstart.yaml", ["run.device=cpu"]),
    "cpu-cnn": (ROOT / "recipes" / "digits-cnn.yaml", ["run.device=cpu"]),
    "cpu-cnn-compiled": (CNN_RECIPE, ["run.device=cpu", "trainer.compile=default", "model.channels=[16,32,64]",
                                      "data.factory_kwargs={n: 4096, size: 16}", "data.batch_size=64",
                                      "trainer.max_steps=400"]),
    "cuda-cnn-fp32": (CNN_RECIPE, []),
    "cuda-cnn-bf16": (CNN_RECIPE, ["trainer.precision=bf16"]),
    "cuda-cnn-compiled": (CNN_RECIPE, ["trainer.compile=default"]),
    "cuda-cnn-compiled-nondet": (CNN_RECIPE, ["trainer.compile=default", "run.deterministic=false"]),
    "cuda-lm-fp32": (LM_RECIPE, []),
    "cuda-lm-bf16": (LM_RECIPE, ["trainer.precision=bf16"]),
}
SMOKE = ["trainer.max_steps=60", "trainer.eval_every=20", "trainer.log_every=10", "seeds.incubation_steps=10",
         "seeds.blend_steps=10", "seeds.probation_steps=5", "policy.trigger=periodic", "policy.period_steps=10",
         "policy.growth_window=[0.1,0.6]"]
SMOKE_DATA = {"images": ["data.factory_kwargs={n: 512, size: 16}", "model.channels=[8,16]", "data.batch_size=32"],
              "tokens": ["data.factory_kwargs={n: 256, seq_len: 33}", "model.d_model=32", "model.n_layers=1",
                         "data.batch_size=8"]}


@dataclass
class Clock:
    """Wall-clock time at the end of each logged step (a synchronising point: the loss is read)."""

    at: dict[int, float] = field(default_factory=dict)
    events: list[tuple[int, str]] = field(default_factory=list)
    compiles: list[dict[str, Any]] = field(default_factory=list)  # graph_compiled notices (off-thread compiles)

    def rate(self, start: int, end: int) -> float:
        return (end - start) / (self.at[end] - self.at[start])

    def stalls(self, eval_every: int, after: int) -> list[float]:
        """Per topology event: its logging interval minus the median interval of the same kind."""
        steps = sorted(s for s in self.at if s >= after)
        intervals = {b: self.at[b] - self.at[a] for a, b in zip(steps, steps[1:])}
        starts = dict(zip(steps[1:], steps))

        def kind(end: int) -> bool:  # does the interval (start, end] hold a validation pass?
            return any(s % eval_every == 0 for s in range(starts[end] + 1, end + 1))

        typical = {k: statistics.median([t for e, t in intervals.items() if kind(e) == k] or [math.nan])
                   for k in (False, True)}
        out = []
        for step, _ in self.events:
            # the event's own work (a verdict's evaluations) ends step `step`; the first pass of the
            # new topology (and a compile on the training thread) is step `step + 1`
            ends = {next((e for e in steps if e >= s and e in intervals), None) for s in (step, step + 1)} - {None}
            if ends:
                out.append(sum(max(0.0, intervals[end] - typical[kind(end)]) for end in ends))
        return out


def _recipe_file(base: Any, directory: Path) -> Path:
    if isinstance(base, Path):
        return base
    path = directory / f"{base['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    return path


def run_esper(recipe: Path, overrides: list[str], out: Path) -> tuple[Trainer, dict[str, Any], Clock]:
    clock = Clock()

    def listen(event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            clock.at[int(event["step"])] = time.perf_counter()
        elif event.get("event") in TOPOLOGY_EVENTS:
            clock.events.append((int(event["step"]), str(event["event"])))
        elif event.get("event") == "graph_compiled":
            clock.compiles.append({k: event[k] for k in ("started", "step", "seconds", "seeds", "ok")})

    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={out}", "telemetry.progress=none", *overrides])
    summary = trainer.fit(on_event=listen)
    return trainer, summary, clock


def plain_loss(net: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, device: torch.device,
               dtype: torch.dtype | None, lm: bool) -> torch.Tensor:
    """The plain loops' loss: cross-entropy under autocast (next-token for a language model)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = net(x)
        if lm:
            logits, y = logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1)
        return F.cross_entropy(logits, y)


def plain_loop(trainer: Trainer, model: nn.Module) -> Clock:
    """The user's own loop over the data and settings of ``trainer``'s recipe (see the module docstring)."""
    recipe = trainer.loaded.recipe
    cfg, device = recipe.trainer, trainer.device
    seed_everything(recipe.run.seed, recipe.run.deterministic, device)
    lm = recipe.task.kind == "language_model"
    x_train, y_train = (t.to(device) for t in trainer.data.train.tensors)
    x_val, y_val = (t.to(device) for t in trainer.data.val.tensors)
    model = model.to(device).train()
    params = list(model.parameters())  # the same optimizer kernel as Esper's (fused on the CPU)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if cpu_fused(params) else {}))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    step_model = model if cfg.compile == "none" else torch.compile(model, mode=cfg.compile)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    batch, per_epoch = recipe.data.batch_size, len(x_train) // recipe.data.batch_size

    def loss_of(net: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return plain_loss(net, x, y, device, dtype, lm)

    clock = Clock()
    perm = torch.empty(0)
    for step in range(cfg.max_steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(x_train), device=device)
        rows = perm[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        loss = loss_of(step_model, x_train[rows], y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        done = step + 1
        if done % cfg.eval_every == 0:
            model.eval()
            with torch.no_grad():
                total = sum(float(loss_of(model, x_val[i:i + recipe.data.eval_batch_size],
                                          y_val[i:i + recipe.data.eval_batch_size]))
                            for i in range(0, len(x_val), recipe.data.eval_batch_size))
            model.train()
            assert math.isfinite(total)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            assert math.isfinite(loss.item())
            clock.at[done] = time.perf_counter()
    return clock


def measure(name: str, repeats: int, smoke: bool, work: Path, steps: int | None = None) -> dict[str, Any]:
    base, overrides = CONFIGS[name]
    recipe = _recipe_file(base, work)
    if smoke:
        kind = "tokens" if base is LM_RECIPE else "images"
        overrides = [*overrides, *SMOKE, *(SMOKE_DATA[kind] if isinstance(base, dict) else [])]
        if not torch.cuda.is_available():
            overrides.append("run.device=cpu")
    own = load_recipe(recipe, overrides).recipe  # the configuration's own run, before any --steps
    warmup = _warmup(own.trainer)
    if steps is not None:
        overrides = [*overrides, *_longer(own, steps)]
    # Kernels are compiled into the recipe's workspace first, as CI would (`esper compile --for`): a
    # one-step deterministic run waits for all of them. A run that need not be deterministic does not
    # wait, and on the H200 a fresh compile worker delivered nothing within a whole 1,000-step arm.
    run_esper(recipe, [*overrides, "trainer.max_steps=1", "run.deterministic=true", "trainer.compile=none"],
              work / f"{name}-kernels")
    # The plain loops read the data Esper builds from the recipe (same splits, same order of samples).
    reference = Trainer.from_recipe(recipe, [f"run.output_dir={work / 'unused'}", *overrides])
    cfg = reference.loaded.recipe.trainer
    rates: dict[str, list[float]] = {"esper_dormant": [], "plain_host": [], "esper_growth": [], "plain_final": []}
    stalls: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {"dormant": [], "growth": []}
    grown: Trainer | None = None  # the latest growth run: its final architecture is the plain_final model

    def esper(arm: str, repeat: int) -> None:
        nonlocal grown
        torch._dynamo.reset()  # every arm compiles as in a process of its own (module docstring)
        extra = ["policy.max_seeds=0"] if arm == "dormant" else []
        trainer, summary, clock = run_esper(recipe, [*overrides, *extra], work / f"{name}-{arm}-{repeat}")
        rates[f"esper_{arm}"].append(clock.rate(warmup, cfg.max_steps))
        runs[arm].append(_outcome(summary, clock))
        if arm == "growth":
            stalls.extend(clock.stalls(cfg.eval_every, warmup))
            grown = trainer

    def plain(arm: str) -> None:
        torch._dynamo.reset()
        model = _host_model(reference) if arm == "host" else unwrap(load_run(grown.run_dir))[0]  # type: ignore[union-attr]
        rates[f"plain_{arm}"].append(plain_loop(reference, model).rate(warmup, cfg.max_steps))

    for repeat in range(repeats):
        if repeat % 2 == 0:  # ABBA; a plain_final needs a finished growth run, so repeat 0 starts with Esper
            esper("dormant", repeat), plain("host"), esper("growth", repeat), plain("final")
        else:
            plain("host"), esper("dormant", repeat), plain("final"), esper("growth", repeat)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"config": name, "overrides": overrides, "repeats": repeats, "warmup_steps": warmup,
            "steps": cfg.max_steps, "steps_per_s": rates, "median": med,
            "dormant_ratio": med["esper_dormant"] / med["plain_host"],
            "trainer_ratio": med["esper_growth"] / med["plain_final"],
            "topology_stall_s": {"events": stalls, "median": statistics.median(stalls) if stalls else None,
                                 "max": max(stalls) if stalls else None},
            "runs": runs}


def _longer(own: Any, steps: int) -> list[str]:
    """Overrides that lengthen a configuration's run to ``steps`` and change nothing else: its growth
    window (fractions of the run) is rescaled so that every seed germinates at the step it does in the
    configuration's own run, and :func:`measure` keeps that run's timed window. The longer run then
    differs only by more steps of the final architecture, so it shows how long a run has to be for
    a compile (or any one-off cost of growth) to pay back."""
    if steps < own.trainer.max_steps:
        raise ValueError(f"--steps {steps} is shorter than this configuration's own run "
                         f"({own.trainer.max_steps} steps)")
    start, end = (fraction * own.trainer.max_steps / steps for fraction in own.policy.growth_window)
    return [f"trainer.max_steps={steps}", f"policy.growth_window=[{start!r},{end!r}]"]


def _warmup(cfg: Any) -> int:
    """The first logged step after a fifth of the run (every warm-up cost is behind it)."""
    step = cfg.log_every * math.ceil(cfg.max_steps / 5 / cfg.log_every)
    return min(step, cfg.max_steps - cfg.log_every)


def _host_model(trainer: Trainer) -> nn.Module:
    """A fresh host network of the recipe (what Esper wraps), initialised from the run's seed."""
    recipe = trainer.loaded.recipe
    with torch.random.fork_rng():
        torch.manual_seed(recipe.run.seed)
        return build_model(recipe.model, trainer.data.input_shape, trainer.data.num_classes)


def _outcome(summary: dict[str, Any], clock: Clock) -> dict[str, Any]:
    keep = ("val_loss", "test_loss", "test_accuracy", "test_perplexity", "params_initial", "params_final", "seeds")
    return {k: summary[k] for k in keep if k in summary} | {"topology_events": clock.events,
                                                            "graph_compiles": clock.compiles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None, help="comma-separated configurations (default: those the "
                        "machine can run: cpu-cnn, and every cuda-* one when a GPU is present)")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats per arm (default 2)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per configuration (for tests)")
    parser.add_argument("--steps", type=int, default=None, help="run length (default: each configuration's own). "
                        "Seeds germinate at the same steps as in the configuration's own run and steps/s are "
                        "timed from the same step, so only the steps of the final architecture are added: how "
                        "long must a run be for a compile to pay back?")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be a positive number of steps")
    names = args.configs.split(",") if args.configs else \
        [n for n in CONFIGS if n.startswith("cpu") or torch.cuda.is_available()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    results: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="esper-throughput-") as work:
        for name in names:
            try:
                result = measure(name, args.repeats, args.smoke, Path(work), args.steps)
            except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the others' figures
                failures.append({"config": name, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            results.append(result)
            stall = result["topology_stall_s"]["median"]
            print(f"{name}: dormant_ratio {result['dormant_ratio']:.3f} trainer_ratio {result['trainer_ratio']:.3f} "
                  f"steps/s {json.dumps({k: round(v, 1) for k, v in result['median'].items()})} "
                  f"topology_stall_s {stall if stall is None else round(stall, 3)}", flush=True)
    report = {"benchmark": "throughput", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "python": platform.python_version(), "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "results": results, "failures": failures,
              "min_dormant_ratio": min((r["dormant_ratio"] for r in results), default=math.nan),
              "min_trainer_ratio": min((r["trainer_ratio"] for r in results), default=math.nan)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"throughput min dormant_ratio {report['min_dormant_ratio']:.3f} "
          f"min trainer_ratio {report['min_trainer_ratio']:.3f}" + (f" ({len(failures)} failed)" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
