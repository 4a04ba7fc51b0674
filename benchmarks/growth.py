"""Does growing help? Esper's growth against static and random controls, over paired seeds.

    python benchmarks/growth.py [--quick] [--seeds N] [--jobs J] [--datasets digits,mnist1d]
                                [--cache DIR] [--json PATH]

Arms, each trained with the same data split, order and initial host weights per seed:

- ``S-small``:  the host as growth starts from, never grown.
- ``S-large``:  the host with 4x the hidden width, never grown.
- ``G-esper``:  the host grown by Esper's policy: periodic trigger (once per seed lifecycle) inside
  the default growth window, gradient merit, the default UCB1 selector and DIVERSIFY, with a
  parameter budget that keeps it at most half the size of S-large (the target's own limit).
- ``G-random``: the same number and timing of germinations as G-esper's run of the same seed, but
  where (layer) and what (blueprint) drawn at random among the pairs free at that step, preferring a
  seed of similar size (within 2x of G-esper's); its seeds go through the same verdicts.
- ``S-final``:  G-esper's final architecture trained from scratch: its fossilized seeds installed at
  step 0 as permanent branches (the kernels' own initial weights, full weight from the start).

Datasets: ``digits`` (scikit-learn's 8x8 digits, flat, MLP host of widths 32, 32) and ``mnist1d``
(:mod:`mnist1d_like`, an offline MNIST-1D-style generator, 4000 samples, MLP host of widths 32, 32).

Reported per arm: test accuracy, final parameters, and analytic training FLOPs: per optimizer step
``batch x (3 x host forward + forward and backward of every seed in the forward pass)``, plus the
cost of growth decisions (health measurements, gradient-merit SVDs, signal read-outs, and the two
forward passes over the held-out batches of every counterfactual evaluation). Validation passes for
monitoring are the same schedule in every arm and are not counted. Static arms do not measure.
Comparisons are paired by seed: mean difference and a 95% bootstrap interval of it.

Every finished run is cached as JSON in ``--cache`` (keyed by dataset, arm, seed and the recipe
settings above), so an interrupted run resumes and ``--jobs`` spreads seeds over processes; after
changing Esper's policy code, use a fresh ``--cache``. ``--quick`` runs 3 seeds of
shorter training: a smoke test, not evidence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ARMS = ("S-small", "S-large", "S-final", "G-random", "G-esper")
BOOTSTRAP = 10_000


@dataclass(frozen=True)
class Setting:
    """One dataset's recipe knobs (full and ``--quick`` lengths)."""

    data: str
    inputs: int
    widths: tuple[int, ...]
    rank: int  # seeds.rank: sizes the blueprints so that several fit in G-esper's budget
    steps: int
    quick_steps: int
    lifecycle: int  # incubation = blend = embargo = growth period; probation is half


SETTINGS = {
    "digits": Setting("{{source: digits, layout: flat, batch_size: 64}}", 64, (32, 32), 4, 1500, 600, 100),
    "mnist1d": Setting("{{source: file, path: {npz}, layout: flat, batch_size: 64}}", 40, (32, 32), 8, 3000, 1000, 150),
}

RECIPE = """\
run: {{name: {name}, seed: {seed}, device: cpu, output_dir: {out}}}
data: {data}
model: {{arch: mlp, widths: {widths}}}
seeds: {{targets: ["type:Linear"], exclude: [head], per_layer: 2, blueprints: [lowrank_adapter, wide_mlp],
        rank: {rank}, incubation_steps: {life}, blend_steps: {life}, probation_steps: {half}, embargo_steps: {life}}}
policy: {{trigger: periodic, period_steps: {life}, max_added_params: {budget}, max_seeds: 6}}
trainer: {{max_steps: {steps}, lr: 0.003, eval_every: 25, log_every: 25}}
telemetry: {{progress: none}}
storage: {{workspace: {workspace}}}
"""


def mlp_params(inputs: int, widths: tuple[int, ...], classes: int = 10) -> int:
    sizes = [inputs, *widths, classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


# --- one run -------------------------------------------------------------------------------------


class FlopCounter:
    """Analytic training FLOPs of one trainer, counted by wrapping the few calls that cost them."""

    def __init__(self, trainer: Any, measure: bool) -> None:
        import torch

        from esper_core.compiler.flops import analytic_cost
        from esper_core.policy.merit import merit_flops
        from esper_core.policy.signals import measurement_flops, projection_width, readout_flops

        self.trainer, self.train, self.growth = trainer, 0, 0
        self.batch = trainer.loaded.recipe.data.batch_size
        self.verdict_samples = sum(len(y) for _, y in trainer.verdict_batches)
        self.host_forward, rows = _host_forward_flops(trainer.model, trainer.data.input_shape)
        self._seed: dict[tuple[str, str], tuple[int, int]] = {}
        self._analytic = analytic_cost
        layers = trainer.manager.layers
        widths = {n: (projection_width(l), l.spec.out_features) for n, l in layers.items()}
        self.measurement = sum(merit_flops(l.host.weight.numel()) for l in layers.values()) + \
            sum(measurement_flops(i, o, self.batch, rows[n]) for n, (i, o) in widths.items())
        self.readout = sum(readout_flops(i, o) for i, o in widths.values())
        step, verdict, contribution = trainer._train_step, trainer._verdict, trainer._contribution

        def counted_step() -> torch.Tensor:
            self.train += self.batch * (3 * self.host_forward + self._seeds(forward_only=False))
            return step()

        def counted_verdict(ref: Any) -> None:
            self.growth += 2 * self.verdict_samples * (self.host_forward + self._seeds(forward_only=True))
            verdict(ref)

        def counted_contribution(ref: Any) -> float:
            self.growth += 2 * self.verdict_samples * (self.host_forward + self._seeds(forward_only=True))
            return contribution(ref)

        trainer._train_step, trainer._verdict, trainer._contribution = counted_step, counted_verdict, counted_contribution
        if measure:
            observe, read = trainer.merit.observe, trainer.policy.layers.read

            def counted_observe(manager: Any) -> None:
                self.growth += self.measurement
                observe(manager)

            def counted_read() -> Any:
                self.growth += self.readout
                return read()

            trainer.merit.observe, trainer.policy.layers.read = counted_observe, counted_read

    def _seeds(self, forward_only: bool) -> int:
        total = 0
        for name, layer in self.trainer.manager.layers.items():
            for slot in layer.slots:
                if slot.state.contributes:
                    key = (str(slot.blueprint), name)
                    if key not in self._seed:
                        spec = self.trainer._kernel_spec(*key)
                        cost = self._analytic(spec.resolve(), spec.sample_shape)
                        self._seed[key] = (cost.forward, cost.backward)
                    forward, backward = self._seed[key]
                    total += forward if forward_only else forward + backward
        return total


def _host_forward_flops(model: Any, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Forward FLOPs per sample of every Linear/Conv2d of the host (2 per multiply-add, plus bias),
    and the rows (positions) each wrapped layer's output has per sample."""
    import torch
    from torch import nn

    flops, rows, hooks = [0], {}, []

    def hook(name: str):
        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            per_out = module.in_features if isinstance(module, nn.Linear) else \
                module.in_channels // module.groups * math.prod(module.kernel_size)
            flops[0] += out.numel() * (2 * per_out + (module.bias is not None))
            rows[name.removesuffix(".host")] = out.numel() // out.shape[1 if out.dim() == 4 else -1]
        return count

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return flops[0], rows


def _random_replay(trainer: Any, schedule: list[dict[str, Any]], seed: int) -> None:
    """Make ``trainer`` germinate at G-esper's steps, choosing layer and blueprint at random."""
    from esper_core.policy.growth import Decisions, GrowthDecision
    from esper_core.seeds.lifecycle import SeedState
    from esper_core.seeds.manager import SlotRef

    rng = np.random.default_rng([seed, 0xC0FFEE])
    pending = deque((e["step"], e["params"]) for e in schedule)
    policy = trainer.policy

    def decide(step: int, manager: Any, merit: dict[str, float], measure: Any) -> Decisions:
        out = Decisions()
        used = sum(s.params for l in manager.layers.values() for s in l.slots
                   if s.state.live or s.state == SeedState.FOSSILIZED)
        taken: set[str] = set()  # layers given a seed in this call (one experiment per layer, as G-esper)
        while pending and pending[0][0] <= step:
            pairs = []
            for name, layer in manager.layers.items():
                free = [i for i, s in enumerate(layer.slots) if s.state == SeedState.DORMANT]
                if not free or name in taken or any(s.state.live for s in layer.slots):
                    continue
                for blueprint in policy.blueprints_for(policy.kinds[name]):
                    params = policy.cost_of(blueprint, name).params
                    if used + params <= policy.config.max_added_params:
                        pairs.append((name, free[0], blueprint, params))
            if not pairs:
                break  # nothing free now: try again at the next evaluation
            target = pending.popleft()[1]
            similar = [p for p in pairs if target / 2 <= p[3] <= 2 * target] or pairs
            name, index, blueprint, params = similar[int(rng.integers(len(similar)))]
            taken.add(name)
            used += params
            out.germinations.append(GrowthDecision(SlotRef(name, index), blueprint,
                                                   f"random replay of a G-esper germination (step {step})", 0.0))
        return out

    policy.decide = decide


def _install_fossilized(trainer: Any, seeds: list[dict[str, Any]]) -> None:
    """S-final: put G-esper's fossilized seeds in at step 0 as permanent branches at full weight."""
    from esper_core.seeds.manager import SlotRef
    from esper_core.training import optim

    recipe = trainer.loaded.recipe
    dtype = next(trainer.model.parameters()).dtype
    for seed in seeds:
        ref = SlotRef(seed["layer"], seed["slot"])
        spec = trainer._kernel_spec(seed["blueprint"], ref.layer)
        module = trainer._kernel(spec).result().instantiate(trainer.device, dtype)
        trainer.manager.germinate(ref, seed["blueprint"], spec.address(), spec.resolve().params)
        trainer.manager.start_incubation(ref, module)
        layer = trainer.manager.layers[ref.layer]
        layer.start_blending(ref.index)
        layer.start_probation(ref.index)
        trainer.manager.fossilize(ref)
        optim.add_group(trainer.optimizer, ref.key, trainer.manager.seed_parameters(ref),
                        recipe.trainer.lr * recipe.seeds.lr_scale)


def run_arm(dataset: str, arm: str, seed: int, quick: bool, cache: Path,
            esper: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one arm of one seed (``esper``: the G-esper result that G-random and S-final copy)."""
    import torch

    from esper_core.training.trainer import Trainer

    torch.set_num_threads(1)
    setting = SETTINGS[dataset]
    widths = tuple(4 * w for w in setting.widths) if arm == "S-large" else setting.widths
    budget = mlp_params(setting.inputs, tuple(4 * w for w in setting.widths)) // 2 - \
        mlp_params(setting.inputs, setting.widths)
    life = setting.lifecycle // 2 if quick else setting.lifecycle
    recipe = cache / "recipes" / f"{dataset}-{arm}-{seed}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(RECIPE.format(
        name=f"{dataset}-{arm}-{seed}", seed=seed, out=cache / "runs", widths=list(widths), rank=setting.rank,
        data=setting.data.format(npz=cache / "mnist1d.npz"), life=life, half=life // 2, budget=budget,
        steps=setting.quick_steps if quick else setting.steps, workspace=cache / "workspace"), encoding="utf-8")
    static = arm.startswith("S-")
    overrides = ["policy.max_seeds=0", "policy.merit_every=100000"] if static else []
    trainer = Trainer.from_recipe(recipe, overrides)
    counter = FlopCounter(trainer, measure=not static)
    if arm == "G-random":
        assert esper is not None
        _random_replay(trainer, esper["germinations"], seed)
    if arm == "S-final":
        assert esper is not None
        _install_fossilized(trainer, esper["fossilized"])
    started = time.perf_counter()
    summary = trainer.fit()
    events = [json.loads(line) for line in (Path(summary["run_dir"]) / "events.jsonl").read_text().splitlines()]
    return {"dataset": dataset, "arm": arm, "seed": seed, "test_accuracy": summary["test_accuracy"],
            "val_accuracy": summary["val_accuracy"], "params": summary["params_final"],
            "flops_train": counter.train, "flops_growth": counter.growth, "flops": counter.train + counter.growth,
            "germinations": [{"step": e["step"], "layer": e["layer"], "slot": e["slot"], "blueprint": e["blueprint"],
                              "params": e["params"]} for e in events if e["event"] == "germinate"],
            "fossilized": summary["fossilized"], "wall_s": round(time.perf_counter() - started, 2)}


def run_chain(dataset: str, seed: int, quick: bool, cache: Path, key: str) -> list[dict[str, Any]]:
    """Every arm of one (dataset, seed), reusing cached results; G-esper before the arms that copy it."""
    results = {}
    for arm in ("G-esper", "G-random", "S-final", "S-small", "S-large"):
        path = cache / "results" / f"{key}-{dataset}-{arm}-{seed}.json"
        if path.is_file():
            results[arm] = json.loads(path.read_text())
            continue
        results[arm] = run_arm(dataset, arm, seed, quick, cache, results.get("G-esper"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results[arm]))
        tmp.replace(path)
    return list(results.values())


# --- statistics and report ------------------------------------------------------------------------


def paired(a: list[float], b: list[float], seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` (paired) and its 95% bootstrap interval."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(len(d))}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        by_arm = {arm: sorted((r for r in runs if r["dataset"] == dataset and r["arm"] == arm), key=lambda r: r["seed"])
                  for arm in ARMS}
        arms = {arm: {"test_accuracy": float(np.mean([r["test_accuracy"] for r in rs])),
                      "test_accuracy_std": float(np.std([r["test_accuracy"] for r in rs])),
                      "params": float(np.mean([r["params"] for r in rs])),
                      "flops": float(np.mean([r["flops"] for r in rs])),
                      "flops_growth": float(np.mean([r["flops_growth"] for r in rs])), "seeds": len(rs)}
                for arm, rs in by_arm.items() if rs}
        acc = {arm: [100 * r["test_accuracy"] for r in rs] for arm, rs in by_arm.items()}
        g, large = arms["G-esper"], arms["S-large"]
        vs_large = paired(acc["G-esper"], acc["S-large"])
        vs_random = paired(acc["G-esper"], acc["G-random"])
        out[dataset] = {"arms": arms, "comparisons": {
            "G-esper - S-large (points)": vs_large, "G-esper - G-random (points)": vs_random,
            "G-esper - S-final (points)": paired(acc["G-esper"], acc["S-final"]),
            "G-esper - S-small (points)": paired(acc["G-esper"], acc["S-small"]),
            "params G-esper / S-large": g["params"] / large["params"],
            "flops G-esper / S-large": g["flops"] / large["flops"]},
            "targets": {"within 0.5 points of S-large": vs_large["mean"] >= -0.5,
                        "at most 50% of S-large's parameters": g["params"] <= 0.5 * large["params"],
                        "fewer training FLOPs than S-large": g["flops"] < large["flops"],
                        "above G-random, 95% interval excludes 0": vs_random["low"] > 0}}
    return out


def print_report(summary: dict[str, Any]) -> None:
    for dataset, result in summary.items():
        print(f"\n{dataset}")
        print(f"  {'arm':<10}{'test acc %':>14}{'params':>10}{'train GFLOPs':>14}{'growth GFLOPs':>15}{'seeds':>7}")
        for arm, a in result["arms"].items():
            print(f"  {arm:<10}{100 * a['test_accuracy']:>8.2f} ±{100 * a['test_accuracy_std']:>4.2f}"
                  f"{a['params']:>10.0f}{a['flops'] / 1e9:>14.3f}{a['flops_growth'] / 1e9:>15.4f}{a['seeds']:>7}")
        for name, value in result["comparisons"].items():
            if isinstance(value, dict):
                print(f"  {name:<30} {value['mean']:+.2f}  [95% {value['low']:+.2f}, {value['high']:+.2f}], n={value['n']}")
            else:
                print(f"  {name:<30} {value:.3f}")
        for name, met in result["targets"].items():
            print(f"  target: {name:<45} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds of shorter training (a smoke test)")
    parser.add_argument("--seeds", type=int, help="paired seeds (default 10, --quick 3)")
    parser.add_argument("--jobs", type=int, default=1, help="processes, one (dataset, seed) each")
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--cache", type=Path, default=Path("runs/growth-benchmark"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 10)
    datasets = [d for d in args.datasets.split(",") if d]
    cache = args.cache.resolve()
    sys.path.insert(0, str(Path(__file__).parent))
    import mnist1d_like
    mnist1d_like.write_npz(cache / "mnist1d.npz")
    key = hashlib.sha256((RECIPE + repr(SETTINGS) + str(args.quick)).encode()).hexdigest()[:12]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for d in datasets:  # seed 0 of each dataset alone first: it compiles the dataset's kernels once
        runs += run_chain(d, 0, args.quick, cache, key)
    rest = [(d, s, args.quick, cache, key) for d in datasets for s in range(1, seeds)]
    if args.jobs > 1 and rest:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for chain in pool.map(run_chain, *zip(*rest)):
                runs += chain
    else:
        for task in rest:
            runs += run_chain(*task)
    summary = summarise(runs)
    print(f"growth benchmark: {seeds} paired seeds, {'quick' if args.quick else 'full'} settings, "
          f"{time.perf_counter() - started:.0f} s (cached runs reused: {cache})")
    print_report(summary)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "growth", "quick": args.quick, "seeds": seeds,
                                         "datasets": datasets, "summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
