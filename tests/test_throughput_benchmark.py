"""benchmarks/throughput.py end to end in its smoke size: every arm of the CPU configurations and the
language-model configuration (run on the CPU here) trains, the plain loop does the same number of
steps, and the JSON carries the figures the README quotes. No speed is asserted (benchmarks do that)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_arm_and_ends_with_the_key_figure(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--repeats", "1",
                           "--configs", "cpu-quickstart,cpu-cnn,cuda-lm-bf16", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("throughput min dormant_ratio ")
    report = json.loads(out.read_text(encoding="utf-8"))
    assert not report["failures"] and [r["config"] for r in report["results"]] == \
        ["cpu-quickstart", "cpu-cnn", "cuda-lm-bf16"]
    for result in report["results"]:
        assert set(result["median"]) == {"esper_dormant", "plain_host", "esper_growth", "plain_final"}
        assert all(v > 0 for v in result["median"].values())
        assert result["dormant_ratio"] == result["median"]["esper_dormant"] / result["median"]["plain_host"]
    assert report["min_dormant_ratio"] == min(r["dormant_ratio"] for r in report["results"])


def test_a_topology_stall_counts_the_first_pass_of_the_new_topology() -> None:
    """A seed event at step s is followed by the new topology's first pass at step s + 1, where a
    compile on the training thread lands: the stall holds the interval of each, not only the first."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import Clock

    clock = Clock()
    for step in range(0, 201, 25):  # 1 s per logging interval, validation every 100 steps adds nothing here
        clock.at[step] = step / 25
    for step in range(150, 201, 25):
        clock.at[step] += 4.0  # a 4 s compile in the interval (125, 150]: step 126 ran the new topology
    clock.events.append((125, "fossilize"))
    assert clock.stalls(eval_every=100, after=0) == [4.0]


def test_a_longer_run_grows_at_the_same_steps(tmp_path: Path) -> None:
    """``--steps`` lengthens a configuration's run without moving its growth: the seeds incubate at the
    steps they do in the configuration's own run, so the longer run only adds steps of the final
    architecture (what the compile pay-back figure needs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import CONFIGS, SMOKE, _longer, run_esper

    from esper_core.recipe.load import load_recipe

    recipe, overrides = CONFIGS["cpu-cnn"]
    overrides = [*overrides, *SMOKE]
    own = load_recipe(recipe, overrides).recipe
    incubations = {}
    for steps in (own.trainer.max_steps, 3 * own.trainer.max_steps):
        longer = _longer(own, steps)
        _, summary, clock = run_esper(recipe, [*overrides, *longer], tmp_path / f"run-{steps}")
        assert summary["steps"] == steps
        incubations[steps] = [step for step, event in clock.events if event == "incubate"]
    short, long = incubations.values()
    assert short and long == short
