"""How long `esper --help` and `esper --version` take, against a bare interpreter start (target: <= 0.5 s).

    python benchmarks/cli_startup.py [--runs 15] [--json PATH]

Each command is started as a fresh process, as a user starts it: the installed console script next
to this interpreter (``python -m esper_cli`` if there is none). The baseline, timed in the same run and
interleaved with the commands so that machine load hits all of them alike, is ``python -c pass``.
Figures are medians over ``--runs`` starts; ``help_s`` is the key figure (printed last), and
``help_ratio`` is it over the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def esper_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "esper"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "esper_cli"]


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    return time.perf_counter() - start


def measure(runs: int) -> dict[str, object]:
    commands = {"baseline": [sys.executable, "-c", "pass"], "help": [*esper_command(), "--help"],
                "version": [*esper_command(), "--version"]}
    for command in commands.values():  # warm the page cache and .pyc files once
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(wall_time(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"benchmark": "cli_startup", "runs": runs, "command": " ".join(commands["help"]),
            "baseline_s": median["baseline"], "version_s": median["version"], "help_s": median["help"],
            "help_ratio": median["help"] / median["baseline"], "target_help_s": 0.5,
            "help_max_s": max(times["help"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.runs)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"python -c pass: {result['baseline_s']:.3f} s; esper --version: {result['version_s']:.3f} s; "
          f"slowest esper --help: {result['help_max_s']:.3f} s")
    print(f"esper --help: {result['help_s']:.3f} s median over {args.runs} starts "
          f"({result['help_ratio']:.1f}x python -c pass; target <= 0.5 s)")


if __name__ == "__main__":
    main()
