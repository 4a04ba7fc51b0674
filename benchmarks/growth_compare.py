"""Compare two growth-benchmark results on the same seeds: does a policy change beat the one before it?

    python benchmarks/growth_compare.py NEW.json OLD.json [--json PATH]

``NEW.json`` and ``OLD.json`` are ``benchmarks/growth.py --json`` results of the same tasks, hosts,
seeds and training, e.g. the current defaults and a ``--recipe`` that restores an earlier default.
For every task and host both hold, it prints the paired differences (by run seed) of test accuracy in
points, with paired-t and bootstrap 95% intervals and the seeds ahead:

- ``G-esper: new - old``: the policy change itself;
- ``G-random: new - old``: what the change did to the random arm (which shares the strategy, budgets
  and lifecycle, so a change there can move it too);
- ``new G-esper - stronger G-random``: the new policy against whichever random arm scored higher
  (a change that only weakened the random baseline should not look like progress).

The last line is the key figure: every task/host's ``G-esper: new - old`` mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from growth import paired  # noqa: E402  (the growth benchmark's own statistics)


def accuracies(result: dict[str, Any], arm: str) -> dict[tuple[str, str], dict[int, float]]:
    """Test accuracy in points per (task, host), keyed by run seed."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for run in result["runs"]:
        if run["arm"] == arm:
            out.setdefault((run["task"], run["host"]), {})[int(run["seed"])] = 100.0 * float(run["test_accuracy"])
    return out


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ``task/host`` held by both: the three paired differences of the module docstring."""
    if new.get("training") != old.get("training"):
        raise ValueError(f"the two results trained differently: {new.get('training')} against {old.get('training')}")
    esper_new, esper_old = accuracies(new, "G-esper"), accuracies(old, "G-esper")
    random_new, random_old = accuracies(new, "G-random"), accuracies(old, "G-random")
    out: dict[str, dict[str, Any]] = {}
    for where in sorted(set(esper_new) & set(esper_old)):
        entry: dict[str, Any] = {"G-esper: new - old": _with_wins(paired(esper_new[where], esper_old[where]),
                                                                 esper_new[where], esper_old[where])}
        if where in random_new and where in random_old:
            entry["G-random: new - old"] = paired(random_new[where], random_old[where])
            stronger = max((random_new[where], random_old[where]), key=lambda arm: sum(arm.values()) / len(arm))
            entry["new G-esper - stronger G-random"] = paired(esper_new[where], stronger)
            entry["stronger G-random"] = "new" if stronger is random_new[where] else "old"
        out["/".join(where)] = entry
    if not out:
        raise ValueError("the two results share no task and host with G-esper runs")
    return out


def _with_wins(diff: dict[str, Any], a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    return diff | {"ahead": sum(a[s] > b[s] for s in diff["seeds"])}


def _fmt(d: dict[str, Any]) -> str:
    t_low, t_high = d["t95"]
    b_low, b_high = d["bootstrap95"]
    ahead = f", ahead on {d['ahead']} of {d['n']}" if "ahead" in d else ""
    return (f"{d['mean']:+.2f} (t95 [{t_low:+.2f}, {t_high:+.2f}], bootstrap95 [{b_low:+.2f}, {b_high:+.2f}], "
            f"n={d['n']}{ahead})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path, help="benchmarks/growth.py --json result of the new policy")
    parser.add_argument("old", type=Path, help="the same benchmark, same seeds, with the policy compared against")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    try:
        results = [json.loads(path.read_text(encoding="utf-8")) for path in (args.new, args.old)]
        comparison = compare(*results)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"cannot compare {args.new} with {args.old}: {exc}")
    for where, entry in comparison.items():
        print(where)
        for key in ("G-esper: new - old", "G-random: new - old", "new G-esper - stronger G-random"):
            if key in entry:
                stronger = f" ({entry['stronger G-random']})" if key.endswith("stronger G-random") else ""
                print(f"  {key}{stronger:6s} {_fmt(entry[key])}")
    if args.json:
        args.json.write_text(json.dumps({"new": str(args.new), "old": str(args.old), "comparison": comparison},
                                        indent=2), encoding="utf-8")
    print("key figure: G-esper new - old, points: "
          + "; ".join(f"{where} {entry['G-esper: new - old']['mean']:+.2f}" for where, entry in comparison.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
