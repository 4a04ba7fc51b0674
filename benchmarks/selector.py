"""How long the SeedSelector takes to decide, per strategy (target: <= 50 us per decision).

    python benchmarks/selector.py [--decisions 20000] [--json PATH]

A decision is ``SeedSelector.choose`` over the candidates of one layer (6 blueprints, each with a
health prior) after 50 rewards, i.e. what the growth policy calls once per germination. The
baseline, timed in the same process, is the rule the selector replaced: take the least-tried
allowed blueprint (a ``min`` over a dict of counts). ``decision_us`` is the median over repeated
batches of the per-decision time; ``ratio`` is that over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from esper_core.policy.selector import Candidate, SeedSelector
from esper_core.recipe.schema import SelectorConfig

BLUEPRINTS = 6
REWARDS = 50
VARIANTS = [("ucb1", 1.0), ("thompson", 1.0), ("epsilon_greedy", 1.0), ("greedy", 1.0),
            ("ucb1", 0.95), ("thompson", 0.95), ("epsilon_greedy", 0.95), ("greedy", 0.95)]


def _candidates() -> list[Candidate]:
    return [Candidate(f"bp{i}", "layer3.conv2", "conv2d", 1000 * (i + 1), 10_000 * (i + 1), prior=0.01 * (i + 1))
            for i in range(BLUEPRINTS)]


def _per_call_us(call: Callable[[], object], decisions: int, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(decisions):
            call()
        times.append((time.perf_counter() - start) / decisions * 1e6)
    return statistics.median(times)


def measure(decisions: int) -> dict:
    candidates = _candidates()
    tries = {c.blueprint: i for i, c in enumerate(candidates)}
    baseline = _per_call_us(lambda: min(candidates, key=lambda c: tries.get(c.blueprint, 0)), decisions)
    rows = []
    for strategy, discount in VARIANTS:
        selector = SeedSelector(SelectorConfig(strategy=strategy, discount=discount), seed=0)  # type: ignore[arg-type]
        for i in range(REWARDS):
            selector.reward(f"bp{i % BLUEPRINTS}", "conv2d", 0.001 * (i % 7), 1000, kept=i % 3 != 0)
        us = _per_call_us(lambda: selector.choose(candidates), decisions)
        rows.append({"strategy": strategy, "discount": discount, "decision_us": round(us, 2),
                     "ratio": round(us / baseline, 1), "within_50us": us <= 50.0})
    return {"benchmark": "selector", "blueprints": BLUEPRINTS, "rewards_seen": REWARDS, "decisions": decisions,
            "baseline_least_tried_us": round(baseline, 3), "decision_us": max(r["decision_us"] for r in rows),
            "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.decisions)
    print(f"{'strategy':<16}{'discount':>9}{'decision_us':>13}{'x baseline':>12}")
    for row in result["variants"]:
        print(f"{row['strategy']:<16}{row['discount']:>9}{row['decision_us']:>13.2f}{row['ratio']:>12.1f}")
    print(f"baseline (least-tried min): {result['baseline_least_tried_us']:.3f} us; "
          f"slowest decision {result['decision_us']:.2f} us (target <= 50 us)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
