"""Growth benchmark v2: does growing pay, against static models of every relevant size and a random policy?

    python benchmarks/growth.py [--quick] [--tasks mnist1d,teacher] [--hosts mlp,deep] [--seeds 0-9]
                                [--jobs N] [--recipe recipes/growth-mlp.yaml] [--cache DIR] [--json PATH]

Every arm is one ``esper train`` run of the recipe ``recipes/growth-mlp.yaml`` (``Trainer.from_recipe``
in a worker process, one torch thread each) with command-line overrides. The benchmark fixes the task,
the host, the seed and the training (steps, batch, optimizer, learning rate and schedule, validation
cadence: identical for every arm of a task); G-esper's growth settings are the recipe's, i.e. Esper's
defaults as a user gets them.

Tasks (generated from the run seed, nothing downloaded): ``mnist1d`` (MNIST-1D-style signals, 20,000
samples) and ``teacher`` (labels of a random ReLU teacher 40 -> 64 -> 64 -> 10, 20,000 samples);
``digits`` (the bundled 8x8 digits, flat) is a smoke test only. Hosts: ``mlp`` (hidden widths 32, 32)
and ``deep`` (six hidden layers of 32); the recipe wraps every hidden layer and the head, so span
seeds can widen every hidden layer.

Arms, paired by ``run.seed`` (same data, split, batch order and initial host weights):

- ``S-small``:  the host, never grown (``policy.max_seeds=0``).
- ``S-large``:  the same depth at 4x the width, never grown.
- ``G-esper``:  the host grown by the recipe's (default) policy.
- ``G-random``: the same recipe with ``policy.random=true``: its own seeded random when, where and what
  under the same budgets, lifecycle and verdicts (not a replay of G-esper).
- ``S-budget``: a static MLP of the same depth whose uniform hidden width is the smallest that reaches
  G-esper's final parameter count for the same seed (so it runs after that G-esper run).

Training FLOPs are analytic: forward multiply-adds of every Linear layer per sample (the host's final
architecture for every step; each seed from its ``incubate`` event to its ``cull``/``rollback`` or the
end of the run, from the event log), x 2 FLOPs per multiply-add, x 3 for forward and backward, x batch.
Biases, activations, validation and verdict evaluations are not counted (the same or negligible for
every arm). Differences are test accuracy in points, paired by seed, with a paired-t and a paired
bootstrap 95% interval. The issue-12 targets are checked and printed met or missed, and the key
figure (mnist1d, MLP host: G-esper - S-budget) is printed last.

Finished runs are cached as JSON under ``--cache`` keyed by the recipe, the overrides, and the
contents of the ``esper_core`` package, so an interrupted benchmark resumes and any change to the
product re-runs everything. ``--quick`` is a smoke test (digits, 2 seeds, 600 steps), not evidence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "growth-mlp.yaml"
RECORD_VERSION = 1  # bump when a run record's fields change, so cached records are not reused
ARMS = ("S-small", "S-large", "S-budget", "G-random", "G-esper")
COMPARISONS = ("S-budget", "S-large", "G-random", "S-small")  # G-esper minus each
LARGE = 4  # S-large's width multiple
TARGET_TASKS = ("mnist1d", "teacher")
BOOTSTRAP = 10_000

TASKS: dict[str, tuple[str, ...]] = {
    "mnist1d": ("data.source=mnist1d", "data.mnist1d.n_samples=20000", "data.mnist1d.length=40"),
    "teacher": ("data.source=teacher", "data.teacher.n_samples=20000", "data.teacher.n_features=40",
                "data.teacher.widths=[64,64]", "data.teacher.n_classes=10"),
    "digits": ("data.source=digits", "data.layout=flat"),
}
HOSTS: dict[str, tuple[int, ...]] = {"mlp": (32, 32), "deep": (32,) * 6}


@dataclass(frozen=True)
class Training:
    """The benchmark's definition of training, the same for every arm (fixed before any tuning)."""

    steps: int
    batch: int
    lr: float
    eval_every: int
    optimizer: str = "adamw"
    schedule: str = "cosine"

    def overrides(self) -> list[str]:
        return [f"trainer.max_steps={self.steps}", f"data.batch_size={self.batch}", f"trainer.lr={self.lr}",
                f"trainer.eval_every={self.eval_every}", f"trainer.optimizer={self.optimizer}",
                f"trainer.schedule={self.schedule}", "trainer.weight_decay=0", "trainer.warmup_steps=0"]


FULL = Training(steps=3000, batch=128, lr=3e-3, eval_every=100)
QUICK = Training(steps=600, batch=128, lr=3e-3, eval_every=50)


@dataclass(frozen=True)
class Job:
    """One run: an arm of one (task, host, seed) at hidden widths ``widths``."""

    task: str
    host: str
    arm: str
    seed: int
    widths: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.task}-{self.host}-{self.arm}-s{self.seed}"

    def overrides(self, training: Training) -> list[str]:
        arm = ["policy.max_seeds=0"] if self.arm.startswith("S-") else \
            ["policy.random=true"] if self.arm == "G-random" else []
        return [*TASKS[self.task], f"model.widths=[{','.join(map(str, self.widths))}]", f"run.seed={self.seed}",
                *training.overrides(), *arm]


# --- sizes and FLOPs -----------------------------------------------------------------------------


def mlp_params(sizes: Sequence[int]) -> int:
    """Parameters of an MLP with layer sizes ``[inputs, *widths, outputs]`` (weights and biases)."""
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def mlp_macs(sizes: Sequence[int]) -> int:
    """Forward multiply-adds per sample of the same MLP."""
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def budget_width(inputs: int, outputs: int, depth: int, target_params: int) -> int:
    """The smallest uniform hidden width of a ``depth``-hidden-layer MLP with at least
    ``target_params`` parameters (S-budget: G-esper's size, never below it)."""
    width = 1
    while mlp_params([inputs, *[width] * depth, outputs]) < target_params:
        width += 1
    return width


def seed_macs(resolved: Any, sample_shape: Sequence[int]) -> int:
    """Forward multiply-adds per sample of a resolved (Linear) seed kernel at its input shape."""
    from esper_core.compiler.flops import analytic_cost

    cost = analytic_cost(resolved, tuple(sample_shape))
    shapes = [tuple(sample_shape), *(op.output_shape for op in cost.ops)]
    macs = 0
    for op, shape in zip(resolved.ops, shapes):
        if op.kind == "linear":
            macs += math.prod(shape[:-1]) * op.in_size * op.out_size
        elif op.params:
            raise ValueError(f"the growth benchmark counts Linear seeds only, not {op.kind!r} ops")
    return macs


def seed_lifetimes(events: Iterable[dict[str, Any]], end: int) -> list[tuple[str, str, int, int]]:
    """(layer, blueprint, first step in the forward pass, step it left it) of every seed in an event
    log: from ``incubate`` to ``cull``/``rollback``, or ``end`` for seeds still there."""
    live: dict[tuple[str, int], tuple[str, int]] = {}
    out = []
    for event in events:
        key = (event.get("layer"), event.get("slot"))
        if event["event"] == "incubate":
            live[key] = (event["blueprint"], event["step"])
        elif event["event"] in ("cull", "rollback") and key in live:
            blueprint, start = live.pop(key)
            out.append((str(key[0]), blueprint, start, max(start, event["step"])))
    out += [(str(layer), blueprint, start, max(start, end)) for (layer, _), (blueprint, start) in live.items()]
    return out


def training_flops(host_macs: int, seeds: Iterable[tuple[int, int, int]], steps: int, batch: int) -> int:
    """Analytic training FLOPs: ``host_macs`` every step plus each seed's ``(macs, start, end)`` over
    its steps, x 2 FLOPs per multiply-add, x 3 (forward and backward), x ``batch``."""
    macs_steps = host_macs * steps + sum(macs * (end - start) for macs, start, end in seeds)
    return 6 * batch * macs_steps


# --- one run (in a worker process) ----------------------------------------------------------------


def run_job(job: Job, training: Training, recipe: Path, cache: Path, code_key: str) -> dict[str, Any]:
    """Train one arm (or read its cached record) and return its record."""
    overrides = job.overrides(training)
    key = hashlib.sha256(json.dumps([RECORD_VERSION, code_key, recipe.read_text(encoding="utf-8"), overrides])
                         .encode()).hexdigest()[:20]
    cached = cache / "results" / f"{job.name}-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8")) | {"cached": True}

    import torch

    from esper_core.training.trainer import Trainer

    torch.set_num_threads(1)
    started = time.perf_counter()
    places = [f"run.name={job.name}", f"run.output_dir={cache / 'runs'}", f"storage.workspace={cache / 'workspace'}",
              "run.device=cpu", "telemetry.progress=none"]
    trainer = Trainer.from_recipe(recipe, [*overrides, *places])
    summary = trainer.fit()
    events = [json.loads(line) for line in
              (Path(summary["run_dir"]) / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    sizes = [math.prod(trainer.data.input_shape), *job.widths, trainer.data.num_classes]
    catalog = trainer.controller.catalog
    costs: dict[tuple[str, str], int] = {}
    lifetimes = []
    for layer, blueprint, start, end in seed_lifetimes(events, summary["steps"]):
        if (layer, blueprint) not in costs:
            spec = catalog.spec(blueprint, layer)
            costs[layer, blueprint] = seed_macs(spec.resolve(), spec.sample_shape)
        lifetimes.append((costs[layer, blueprint], start, end))
    record = {
        "task": job.task, "host": job.host, "arm": job.arm, "seed": job.seed, "widths": list(job.widths),
        "inputs": sizes[0], "outputs": sizes[-1],
        "overrides": overrides, "test_accuracy": summary["test_accuracy"], "val_accuracy": summary["val_accuracy"],
        "test_accuracy_muted": summary["seeds_muted"]["test_accuracy"],
        "params": summary["params_final"], "params_initial": summary["params_initial"],
        "flops": training_flops(mlp_macs(sizes), lifetimes, training.steps, training.batch),
        "host_macs": mlp_macs(sizes), "seed_macs_steps": sum(m * (e - s) for m, s, e in lifetimes),
        "events": dict(sorted(Counter(e["event"] for e in events).items())),
        "fossilized": summary["fossilized"], "rollbacks": summary["rollbacks"],
        "summary": {k: v for k, v in summary.items() if k != "fossilized"},
        "wall_s": round(time.perf_counter() - started, 2),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".tmp")
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.replace(cached)
    return record


# --- statistics -------------------------------------------------------------------------------------


def paired_t_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided paired-t interval of the mean difference (NaN for fewer than two pairs)."""
    from scipy.stats import t

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()) - half, float(d.mean()) + half


def bootstrap_interval(diffs: Sequence[float], confidence: float = 0.95, resamples: int = BOOTSTRAP,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean difference over ``resamples`` resamplings of the pairs."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """``a - b`` over the seeds both have: mean, paired-t and bootstrap 95% intervals, seeds."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    t_low, t_high = paired_t_interval(d)
    b_low, b_high = bootstrap_interval(d) if d else (math.nan, math.nan)
    return {"mean": float(np.mean(d)) if d else math.nan, "t95": [t_low, t_high], "bootstrap95": [b_low, b_high],
            "n": len(d), "seeds": seeds}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``task/host``: each arm's accuracy (mean, std), size and FLOPs; G-esper's paired
    differences; G-esper's parameter and FLOP ratios to S-large."""
    out: dict[str, dict[str, Any]] = {}
    order = [(t, h) for t in TASKS for h in HOSTS]
    for task, host in sorted({(r["task"], r["host"]) for r in runs}, key=order.index):
        of = {arm: {r["seed"]: r for r in runs if (r["task"], r["host"], r["arm"]) == (task, host, arm)}
              for arm in ARMS}
        arms = {}
        for arm, by_seed in of.items():
            if by_seed:
                acc = [100 * r["test_accuracy"] for r in by_seed.values()]
                arms[arm] = {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1
                             else 0.0, "params": float(np.mean([r["params"] for r in by_seed.values()])),
                             "flops": float(np.mean([r["flops"] for r in by_seed.values()])), "n": len(by_seed)}
        acc = {arm: {s: 100 * r["test_accuracy"] for s, r in by_seed.items()} for arm, by_seed in of.items()}
        entry: dict[str, Any] = {"arms": arms, "differences": {
            f"G-esper - {other}": paired(acc["G-esper"], acc[other]) for other in COMPARISONS
            if acc["G-esper"] and acc[other]}}
        if "G-esper" in arms and "S-large" in arms:
            entry["params_ratio"] = arms["G-esper"]["params"] / arms["S-large"]["params"]
            entry["flops_ratio"] = arms["G-esper"]["flops"] / arms["S-large"]["flops"]
        out[f"{task}/{host}"] = entry
    return out


def _excludes_zero_above(diff: dict[str, Any]) -> bool:
    return diff["t95"][0] > 0 and diff["bootstrap95"][0] > 0


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue-12 "Must show" targets that the tasks run can decide, each met or missed. An interval
    "excludes 0" when both the paired-t and the bootstrap interval do."""
    out = []

    def add(where: str, key: str, what: str, met: bool, value: str) -> None:
        out.append({"where": where, "id": key, "target": what, "met": bool(met), "value": value})

    near = []
    for task in TARGET_TASKS:
        mlp, deep = summary.get(f"{task}/mlp"), summary.get(f"{task}/deep")
        if mlp and "G-esper - S-budget" in mlp["differences"]:
            d = mlp["differences"]["G-esper - S-budget"]
            add(f"{task}/mlp", "beats S-budget", "G-esper - S-budget > 0, 95% interval excludes 0", _excludes_zero_above(d),
                _fmt_diff(d))
        if mlp and "G-esper - S-large" in mlp["differences"]:
            d = mlp["differences"]["G-esper - S-large"]
            small = mlp["params_ratio"] <= 0.5 and mlp["flops_ratio"] <= 0.5
            sizes = f"params {mlp['params_ratio']:.3f}, FLOPs {mlp['flops_ratio']:.3f} of S-large"
            add(f"{task}/mlp", "near S-large", "G-esper within 1.0 point of S-large at <= 50% of its params and FLOPs",
                d["mean"] >= -1.0 and small, f"{d['mean']:+.2f} points; {sizes}")
            near.append((task, d["mean"] >= -0.5 and small, f"{task} {d['mean']:+.2f}"))
        if mlp and "G-esper - G-random" in mlp["differences"]:
            d = mlp["differences"]["G-esper - G-random"]
            add(f"{task}/mlp", "not below G-random", "lower 95% bound of G-esper - G-random above -0.5",
                min(d["t95"][0], d["bootstrap95"][0]) > -0.5, _fmt_diff(d))
        if deep and "G-esper - G-random" in deep["differences"]:
            d = deep["differences"]["G-esper - G-random"]
            add(f"{task}/deep", "beats G-random", "G-esper - G-random > 0, 95% interval excludes 0", _excludes_zero_above(d),
                _fmt_diff(d))
    if near:
        add("mlp", "close to S-large", "G-esper within 0.5 point of S-large (at <= 50% params and FLOPs) on at least one task",
            any(met for _, met, _ in near), "; ".join(v for _, _, v in near))
    return out


# --- report -------------------------------------------------------------------------------------------


def _fmt_diff(d: dict[str, Any]) -> str:
    return (f"{d['mean']:+.2f} (t95 [{d['t95'][0]:+.2f}, {d['t95'][1]:+.2f}], "
            f"bootstrap95 [{d['bootstrap95'][0]:+.2f}, {d['bootstrap95'][1]:+.2f}], n={d['n']})")


def print_report(summary: dict[str, dict[str, Any]], checks: list[dict[str, Any]], training: Training) -> None:
    for where, entry in summary.items():
        task, host = where.split("/")
        print(f"\n{task}, {host} host (hidden widths {'-'.join(map(str, HOSTS[host]))}), {training.steps} steps")
        print(f"  {'arm':<10}{'test acc %':>16}{'params':>10}{'train GFLOPs':>14}{'n':>5}")
        for arm in ARMS:
            if arm in entry["arms"]:
                a = entry["arms"][arm]
                print(f"  {arm:<10}{a['accuracy']:>9.2f} ± {a['accuracy_std']:<4.2f}{a['params']:>10,.0f}"
                      f"{a['flops'] / 1e9:>14.2f}{a['n']:>5}")
        for name, d in entry["differences"].items():
            print(f"  {name:<20} {_fmt_diff(d)}")
        if "params_ratio" in entry:
            print(f"  G-esper / S-large: params {entry['params_ratio']:.3f}, training FLOPs {entry['flops_ratio']:.3f}")
    if checks:
        print("\ntargets (issue 12, 'Must show'):")
        for c in checks:
            print(f"  {'met   ' if c['met'] else 'MISSED'} {c['where']:<13} {c['target']}: {c['value']}")


def key_figure(summary: dict[str, dict[str, Any]]) -> str:
    """The line printed last: mnist1d/mlp G-esper - S-budget, else the first MLP-host (then any) result."""
    for where in ("mnist1d/mlp", *(w for w in summary if w.endswith("/mlp")), *summary):
        d = summary.get(where, {}).get("differences", {}).get("G-esper - S-budget")
        if d:
            return f"key figure: {where} G-esper - S-budget test accuracy {_fmt_diff(d)} points"
    return "key figure: no G-esper - S-budget pair finished"


# --- driver ---------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """``0-9``, ``100-104`` or ``1,3,5`` (mixable: ``0-4,7``)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"bad seed list {text!r} (e.g. 0-9, 100-104 or 1,3,5)")
    return seeds


def code_fingerprint() -> str:
    """Hash of the installed product's sources: a cached run is reused only for the same code."""
    import esper_core

    root = Path(esper_core.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_all(jobs: list[Job], training: Training, recipe: Path, cache: Path, workers: int,
            failures: list[str]) -> list[dict[str, Any]]:
    """Run every job over ``workers`` processes; each G-esper result releases its S-budget run. Runs
    that raise are appended to ``failures`` (a G-esper failure also skips its S-budget)."""
    code_key = code_fingerprint()
    total = len(jobs) + sum(j.arm == "G-esper" for j in jobs)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending: dict[Future[dict[str, Any]], Job] = {
            pool.submit(run_job, job, training, recipe, cache, code_key): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # one failed run must not lose the others: reported, exit 1
                    failures.append(f"{job.name}: {type(exc).__name__}: {exc}")
                    print(f"FAILED {failures[-1]}", flush=True)
                    continue
                runs.append(record)
                if job.arm == "G-esper":
                    depth = len(job.widths)
                    width = budget_width(record["inputs"], record["outputs"], depth, record["params"])
                    nxt = Job(job.task, job.host, "S-budget", job.seed, (width,) * depth)
                    pending[pool.submit(run_job, nxt, training, recipe, cache, code_key)] = nxt
                elapsed = time.perf_counter() - started
                fresh = [r["wall_s"] for r in runs if not r.get("cached")]
                eta = f", ETA {(total - len(runs)) * elapsed / len(fresh) / 60:.1f} min" if fresh else ""
                print(f"[{len(runs)}/{total}] {job.name}: test acc {100 * record['test_accuracy']:.2f}%, "
                      f"params {record['params']:,}, {record['wall_s']:.0f} s{' (cached)' if record.get('cached') else ''}"
                      f"; elapsed {elapsed / 60:.1f} min{eta}", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, 2 seeds, 600 steps")
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)} (default mnist1d,teacher; "
                        "--quick: digits)")
    parser.add_argument("--hosts", default="mlp,deep", help=f"comma-separated, of {', '.join(HOSTS)}")
    parser.add_argument("--seeds", type=parse_seeds, help="run seeds, e.g. 0-9 (the default), 100-104 or 1,3,5 "
                        "(--quick: 0-1)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one run each (default 1)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe every arm runs (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "growth-v2",
                        help="run directories, kernel workspace and cached run records (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write every figure and every run's record here")
    args = parser.parse_args()
    tasks = (args.tasks or ("digits" if args.quick else "mnist1d,teacher")).split(",")
    hosts = args.hosts.split(",")
    unknown = [t for t in tasks if t not in TASKS] + [h for h in hosts if h not in HOSTS]
    if unknown:
        parser.error(f"unknown task or host: {', '.join(unknown)} (tasks: {', '.join(TASKS)}; hosts: {', '.join(HOSTS)})")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not args.recipe.is_file():
        parser.error(f"no recipe at {args.recipe}")
    seeds = args.seeds or ([0, 1] if args.quick else list(range(10)))
    training = QUICK if args.quick else FULL
    cache = args.cache.resolve()
    jobs = [Job(task, host, arm, seed, tuple(LARGE * w for w in HOSTS[host]) if arm == "S-large" else HOSTS[host])
            for seed in seeds for task in tasks for host in hosts for arm in ("G-esper", "G-random", "S-small", "S-large")]
    started = time.perf_counter()
    print(f"growth benchmark v2: tasks {', '.join(tasks)}; hosts {', '.join(hosts)}; seeds {seeds}; "
          f"{args.jobs} worker(s); {'quick' if args.quick else 'full'} training {asdict(training)}", flush=True)
    failures: list[str] = []
    runs = run_all(jobs, training, args.recipe.resolve(), cache, args.jobs, failures)
    runs.sort(key=lambda r: (r["task"], r["host"], r["seed"], ARMS.index(r["arm"])))
    summary = summarise(runs)
    checks = targets(summary)
    wall = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "growth-v2", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "quick": args.quick, "recipe": str(args.recipe), "tasks": tasks, "hosts": hosts, "seeds": seeds,
            "training": asdict(training), "wall_s": round(wall, 1), "summary": summary, "targets": checks,
            "failures": failures, "runs": runs}, indent=1) + "\n", encoding="utf-8")
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min (cache: {cache})")
    print_report(summary, checks, training)
    if failures:
        print(f"\n{len(failures)} run(s) failed (finished runs are cached; rerun the same command to retry):")
        print("\n".join(f"  {f}" for f in failures))
    print(f"\n{key_figure(summary)}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
