"""What telemetry costs a training run: step time with the metrics endpoint on (and being scraped)
against the same run with metrics off.

The promise (DESIGN, Telemetry): metrics and anomaly detection add no host-device sync and cost no
measurable step time. The target is a ratio of at most 1.02.

Method, and why:

- Both arms are the real thing: ``Trainer.fit`` on the same recipe and seed, so data, growth
  decisions and kernels are identical; the only difference is ``telemetry.metrics_port`` (``0``
  against ``null``). The "on" arm is also scraped every ``--scrape-interval`` seconds (default 1 s,
  fifteen times Prometheus' default rate), inside its own timed stretch, so serving is paid for too.
  Anomaly detection runs in both arms: it is not optional.
- The arms are interleaved finely, in one process: each runs in its own thread, and a baton passed
  at every logged step lets exactly one of them train at a time. So the arms alternate every
  ``log_every`` steps (A B A B ...), and load from other processes, which comes and goes over
  seconds, hits both alike. Which arm starts alternates from round to round (A B ... then B A ...). Each stretch of ``log_every`` steps is timed from the moment its arm
  takes the baton to the moment it hands it back; each A/B pair of stretches gives one ratio, and
  the figure reported is the median of all paired ratios (robust to a stretch that a background
  process slowed). Stretches that contain validation or growth are paired with the same stretch of
  the other arm, since both arms validate and grow at the same steps.
- Each arm keeps its own random-number state across hand-overs (torch, CUDA, numpy, Python), so
  interleaving does not change what either arm draws: both arms initialise the same seeds and reach
  the same verdicts, and the two models stay the same size step for step.
- Logged steps are where the trainer already syncs with the device (it reads the loss), so on CUDA
  a stretch is timed in device time, not launch time.
- The default recipe is a tiny MLP on the bundled digits (steps of about a millisecond on a CPU):
  the worst case for a per-step overhead. ``--recipe`` measures another.

Usage: ``python benchmarks/telemetry.py [--json PATH] [--rounds N] [--steps N] [--device cpu|cuda|auto]
[--recipe PATH] [--scrape-interval S] [--threads N]``. The last line printed is
``telemetry_overhead_ratio X.XXX`` (on / off).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper_core import Trainer

TINY = """\
run: {name: bench, seed: 0}
data: {source: digits, layout: flat, batch_size: 64}
model: {arch: mlp, widths: [64]}
seeds: {targets: ["type:Linear"], exclude: [head], per_layer: 2, blueprints: [lowrank_adapter], rank: 4,
        incubation_steps: 50, blend_steps: 50, probation_steps: 20}
policy: {trigger: periodic, period_steps: 100, growth_window: [0.05, 0.6], max_seeds: 4}
trainer: {max_steps: 1000, lr: 0.005, eval_every: 50, log_every: 10}
telemetry: {progress: none}
"""
WARMUP_STRETCHES = 3
ARMS = ("on", "off")


@dataclass
class RngState:
    """Every global random-number state a training step may draw from."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    numpy: Any  # numpy's legacy state tuple (typed as a dict by numpy's stubs)
    python: tuple[Any, ...]

    @classmethod
    def capture(cls) -> "RngState":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                   np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


@dataclass
class Arm:
    """One side: its trainer, its random state, the timed stretches it trained, its scrapes."""

    name: str
    trainer: Trainer
    scrape_interval: float | None
    rng: RngState
    stretches: dict[int, float] = field(default_factory=dict)  # step at the end of a stretch -> seconds/step
    scrapes: int = 0
    error: BaseException | None = None


class Baton:
    """Exactly one arm trains at a time; the holder passes the baton at each of its logged steps."""

    def __init__(self, first: str) -> None:
        self._cond = threading.Condition()
        self._holder = first
        self._finished: set[str] = set()

    def wait_for(self, me: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._holder == me)

    def pass_on(self, me: str, finished: bool = False) -> None:
        other = ARMS[1] if me == ARMS[0] else ARMS[0]
        with self._cond:
            if finished:
                self._finished.add(me)
            if other not in self._finished:
                self._holder = other
            self._cond.notify_all()
            if not finished:
                self._cond.wait_for(lambda: self._holder == me or other in self._finished)


def train_arm(arm: Arm, baton: Baton) -> None:
    """The thread body of one arm: fit, timing each stretch between baton hand-overs."""
    state = {"started": 0.0, "step": 0, "last_scrape": time.perf_counter()}

    def resume() -> None:
        arm.rng.restore()
        state["started"] = time.perf_counter()
        if arm.scrape_interval is not None and state["started"] - state["last_scrape"] >= arm.scrape_interval:
            server = arm.trainer.recorder.telemetry.server
            if server is not None:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    arm.scrapes += b"esper_step_duration_seconds" in response.read()
            state["last_scrape"] = time.perf_counter()

    def on_progress(event: dict[str, Any]) -> None:
        if event["event"] != "progress" or event["step"] == state["step"]:
            return  # lifecycle events, and a validation report at a step already timed
        step = int(event["step"])
        arm.stretches[step] = (time.perf_counter() - state["started"]) / (step - state["step"])
        state["step"] = step
        arm.rng = RngState.capture()
        baton.pass_on(arm.name)
        resume()

    baton.wait_for(arm.name)
    try:
        resume()
        arm.trainer.fit(on_progress)
    except BaseException as exc:  # reported by the main thread
        arm.error = exc
    finally:
        baton.pass_on(arm.name, finished=True)


def one_round(recipe: Path, overrides: list[str], scrape_interval: float, workdir: Path, first: str
              ) -> dict[str, Arm]:
    trainers = {name: Trainer.from_recipe(recipe, overrides + [
        f"telemetry.metrics_port={'0' if name == 'on' else 'null'}", f"run.output_dir={workdir / name}"])
        for name in ARMS}
    start = RngState.capture()  # as the last trainer built left it: the same starting point for both
    arms = {name: Arm(name, trainer, scrape_interval if name == "on" else None, start)
            for name, trainer in trainers.items()}
    baton = Baton(first)
    threads = [threading.Thread(target=train_arm, args=(arms[name], baton), name=name) for name in ARMS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for arm in arms.values():
        if arm.error is not None:
            raise arm.error
    return arms


@dataclass(frozen=True)
class Outcome:
    telemetry_overhead_ratio: float
    on_step_ms_median: float
    off_step_ms_median: float
    round_ratios: list[float]
    pairs: int
    scrapes: int
    rounds: int
    steps: int
    scrape_interval_s: float
    recipe: str
    device: str
    torch: str
    threads: int
    python: str
    machine: str


def measure(recipe: Path, rounds: int, steps: int, device: str, scrape_interval: float, workdir: Path) -> Outcome:
    overrides = [f"trainer.max_steps={steps}", f"run.device={device}", "telemetry.progress=none"]
    one_round(recipe, overrides, scrape_interval, workdir / "warmup", ARMS[0])
    ratios, on_all, off_all, round_ratios, scrapes = [], [], [], [], 0
    for r in range(rounds):
        arms = one_round(recipe, overrides, scrape_interval, workdir / f"round-{r}", ARMS[r % 2])
        on, off = arms["on"].stretches, arms["off"].stretches
        paired = sorted(set(on) & set(off))[WARMUP_STRETCHES:]
        pair_ratios = [on[s] / off[s] for s in paired]
        ratios += pair_ratios
        on_all += [on[s] for s in paired]
        off_all += [off[s] for s in paired]
        round_ratios.append(statistics.median(pair_ratios))
        scrapes += arms["on"].scrapes
        print(f"round {r + 1}/{rounds}: {len(paired)} paired stretches, median ratio {round_ratios[-1]:.4f}, "
              f"on {statistics.median(on[s] for s in paired) * 1e3:.3f} ms/step, "
              f"off {statistics.median(off[s] for s in paired) * 1e3:.3f} ms/step, {arms['on'].scrapes} scrapes",
              flush=True)
    resolved = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return Outcome(statistics.median(ratios), statistics.median(on_all) * 1e3, statistics.median(off_all) * 1e3,
                   [round(x, 5) for x in round_ratios], len(ratios), scrapes, rounds, steps, scrape_interval,
                   str(recipe), resolved, torch.__version__, torch.get_num_threads(), platform.python_version(),
                   platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of interleaved runs (default 4)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--recipe", type=Path, help="recipe to train (default: a tiny MLP on digits)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as the process has them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="esper-bench-telemetry-") as tmp:
        workdir = Path(tmp)
        recipe = args.recipe
        if recipe is None:
            recipe = workdir / "tiny.yaml"
            recipe.write_text(TINY, encoding="utf-8")
        outcome = measure(recipe, args.rounds, args.steps, args.device, args.scrape_interval, workdir)
    print(f"on  (metrics served and scraped): {outcome.on_step_ms_median:.3f} ms/step (median stretch)")
    print(f"off (metrics off):                {outcome.off_step_ms_median:.3f} ms/step")
    print(f"{outcome.pairs} paired stretches over {outcome.rounds} rounds (round medians "
          f"{', '.join(f'{x:.4f}' for x in outcome.round_ratios)}); {outcome.scrapes} scrapes; device "
          f"{outcome.device}, torch {outcome.torch}, {outcome.threads} threads")
    if args.json:
        args.json.write_text(json.dumps(asdict(outcome), indent=2) + "\n", encoding="utf-8")
    print(f"telemetry_overhead_ratio {outcome.telemetry_overhead_ratio:.4f}")


if __name__ == "__main__":
    main()
