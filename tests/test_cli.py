"""End-to-end tests of the `esper` command, run as a user runs it: in a subprocess, through the
installed console script, with stdout a pipe (so progress output is the plain, CI-log form).

Why subprocesses: exit codes, what lands on stderr and the absence of a traceback are properties of
the real process, and an in-process runner would hide the import-time and interpreter-exit paths.

Why concurrently: every `esper` process imports torch (several seconds of CPU before it does
anything), so the module-scoped :func:`launched` fixture starts every command the tests need at
once, on a small thread pool, and each test only waits for and judges its own result. The whole
module then costs about as much wall time as its longest run instead of the sum of all of them.
Each process gets ``OMP_NUM_THREADS=1``: the models are tiny, and several multi-threaded processes
on a two-core CI runner would spin against each other and run several times slower.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from esper_core.telemetry.jsonl import verify_chain

REPO = Path(__file__).resolve().parents[1]
DIGITS_CNN = REPO / "recipes" / "digits-cnn.yaml"
TIMEOUT_S = 300

MAX_STEPS = 300
INCUBATION, BLEND, PROBATION = 40, 40, 20
LIFECYCLE_OVERRIDES = (
    f"trainer.max_steps={MAX_STEPS}",
    f"seeds.incubation_steps={INCUBATION}",
    f"seeds.blend_steps={BLEND}",
    f"seeds.probation_steps={PROBATION}",
    "policy.trigger=periodic",
    "policy.period_steps=60",
    "trainer.eval_every=20",
    "policy.growth_window=[0.05,0.6]",
)
"""A short digits-CNN run: the first seed germinates at the first evaluation (step 20) and reaches its
verdict 100 steps later; the growth window closes at step 180, so every seed has a verdict long
before step 300 and the final model holds no live seed."""

LIFECYCLE = ("germinate", "incubate", "blend", "probation")
VERDICTS = ("fossilize", "cull")
COMMANDS = ("train", "resume", "compile", "inspect-cache", "report")

# An error line: "error: FILE:LINE: FIELD: MESSAGE" (the recipe path is written without a colon).
LOCATED = re.compile(r"^error: (?P<file>[^:]+):(?P<line>\d+): (?P<field>[\w.]+): (?P<message>.+)$")
STEP_LINE = re.compile(r"^step (?P<step>\d+)/(?P<max>\d+) loss ")

BAD_TARGETS = """\
run:
  name: bad-targets
data:
  source: digits
  layout: image
model:
  arch: cnn
  channels: [4, 8]
seeds:
  targets:
    - "blocks.*.conv*"
    - "features.*"
  blueprints: [residual_conv]
"""

BAD_BLUEPRINT = """\
run:
  name: bad-blueprint
data:
  source: digits
  layout: image
model:
  arch: cnn
  channels: [4, 8]
seeds:
  targets: ["blocks.*.conv*"]
  blueprints:
    - residual_conv
    - no_such_blueprint
"""


def esper_command() -> list[str]:
    """How to start `esper` in a subprocess, from this interpreter's environment.

    The console script installed next to this interpreter is what users run, and it is found even
    when the virtual environment is not activated (PATH may then hold another `esper`, or none).
    If it is missing (package not installed, only importable), fall back to calling the Typer app.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    for name in ("esper", "esper.exe"):
        if (scripts / name).is_file():
            return [str(scripts / name)]
    return [sys.executable, "-c", "from esper_cli.main import app; app(prog_name='esper')"]


def subprocess_env() -> dict[str, str]:
    """The caller's environment, minus what would make output depend on the terminal running pytest."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return env


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    def explain(self) -> str:
        """Shown when an assertion fails, so a CI log says what the command printed."""
        return (f"esper {' '.join(self.args)} -> exit {self.returncode} after {self.wall_s:.1f} s\n"
                f"--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}")


def run_esper(args: Sequence[str | Path], cwd: Path) -> Result:
    text_args = tuple(str(a) for a in args)
    started = time.perf_counter()
    done = subprocess.run([*esper_command(), *text_args], cwd=cwd, env=subprocess_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT_S)
    return Result(text_args, done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


@dataclass(frozen=True)
class Launched:
    """Every command of this module, started at once; ``result(name)`` waits for one."""

    futures: dict[str, Future[Result]]
    work: Path

    def result(self, name: str) -> Result:
        return self.futures[name].result(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    work = tmp_path_factory.mktemp("cli")
    (work / "bad_targets.yaml").write_text(BAD_TARGETS, encoding="utf-8")
    (work / "bad_blueprint.yaml").write_text(BAD_BLUEPRINT, encoding="utf-8")
    # An earlier run of the same name: the new run must leave it exactly as it is and go to NAME-2.
    earlier = work / "runs" / "digits-cnn"
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text('{"earlier": true}\n', encoding="utf-8")
    (work / "empty").mkdir()  # a directory that holds no run and no checkpoint

    commands: dict[str, list[str | Path]] = {
        # Longest first, so it starts at once.
        # A relative output_dir resolves against the current directory (cwd is `work`).
        "lifecycle": ["train", DIGITS_CNN, "run.output_dir=runs", *LIFECYCLE_OVERRIDES],
        "help": ["--help"],
        "bad_targets": ["train", "bad_targets.yaml", "run.output_dir=never"],
        "bad_blueprint": ["train", "bad_blueprint.yaml", "run.output_dir=never"],
        "missing_file": ["train", "no_such_recipe.yaml", "run.output_dir=never"],
        "bad_override": ["train", DIGITS_CNN, "run.output_dir=never", "trainer.max_steps", "=3"],
        "resume": ["resume", "--checkpoint", work / "empty"],
        "report": ["report", work / "runs"],
        "inspect-cache": ["inspect-cache"],
    }
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="esper-cli") as pool:
        futures = {name: pool.submit(run_esper, args, work) for name, args in commands.items()}
        yield Launched(futures, work)
        for future in futures.values():
            future.cancel()


# --- (a) help ------------------------------------------------------------------------------------

def test_help_lists_every_command(launched: Launched) -> None:
    r = launched.result("help")
    assert r.returncode == 0, r.explain()
    for command in COMMANDS:
        listed = re.search(rf"(?<![\w-]){re.escape(command)}(?![\w-])", r.stdout)
        assert listed, f"{command!r} not in help\n{r.explain()}"


# --- (b) a short digits-CNN run, end to end -------------------------------------------------------

@pytest.fixture(scope="module")
def lifecycle(launched: Launched) -> Result:
    r = launched.result("lifecycle")
    assert r.returncode == 0, r.explain()
    assert "Traceback" not in r.stderr, r.explain()
    return r


@pytest.fixture(scope="module")
def run_dir(launched: Launched, lifecycle: Result) -> Path:
    """The run's directory: NAME-2, because NAME held an earlier run (see test (e))."""
    return launched.work / "runs" / "digits-cnn-2"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def test_run_writes_every_artifact(run_dir: Path) -> None:
    for name in ("recipe.yaml", "recipe.sha256", "metrics.jsonl", "events.jsonl", "summary.json",
                 "final/model.safetensors", "final/topology.json"):
        assert (run_dir / name).is_file(), name


def test_a_seed_goes_through_the_whole_lifecycle_in_order(run_dir: Path) -> None:
    events = _jsonl(run_dir / "events.jsonl")
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert [e["step"] for e in events] == sorted(e["step"] for e in events), "events out of step order"

    histories: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for e in events:
        if "layer" in e:
            histories.setdefault((e["layer"], e["slot"]), []).append(e)
    complete = {slot: h for slot, h in histories.items() if len(h) >= 5 and h[4]["event"] in VERDICTS}
    assert complete, f"no seed reached a verdict: {[[e['event'] for e in h] for h in histories.values()]}"
    for slot, history in complete.items():
        kinds = [e["event"] for e in history[:5]]
        assert tuple(kinds[:4]) == LIFECYCLE, f"{slot}: {kinds}"
        germinate, incubate, blend, probation, verdict = (e["step"] for e in history[:5])
        assert germinate == incubate < blend < probation < verdict, f"{slot}: {kinds}"
        # Lifecycle clocks count optimizer steps (linear blend schedule: no gate holds the ramp).
        assert blend - incubate == INCUBATION
        assert probation - blend == BLEND
        assert verdict - probation >= PROBATION
        assert history[4]["state"] == {"fossilize": "FOSSILIZED", "cull": "CULLED"}[history[4]["event"]]
        assert {"val_loss_with", "val_loss_without"} <= history[4].keys(), "verdict without its evidence"


def test_event_chain_verifies_and_summary_anchors_it(run_dir: Path) -> None:
    path = run_dir / "events.jsonl"
    assert verify_chain(path) is None
    last = path.read_bytes().splitlines()[-1]
    assert _summary(run_dir)["events_head"] == hashlib.sha256(last).hexdigest()


def test_summary(run_dir: Path) -> None:
    s = _summary(run_dir)
    assert s["steps"] == MAX_STEPS
    for key in ("val_accuracy", "test_accuracy"):
        assert 0.0 <= s[key] <= 1.0
    topology = json.loads((run_dir / "final" / "topology.json").read_text(encoding="utf-8"))
    slots = [slot for layer in topology["layers"].values() for slot in layer["slots"]]
    assert sum(s["seeds"].values()) == len(slots)
    assert {k: v for k, v in s["seeds"].items() if v} == _count(slot["state"].lower() for slot in slots)
    assert s["params_final"] == s["params_initial"] + sum(f["params"] for f in s["fossilized"])
    assert s["seeds"]["fossilized"] + s["seeds"]["culled"] >= 1


def _count(items: Iterator[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def test_saved_recipe_matches_its_hash_and_the_overrides(run_dir: Path) -> None:
    saved = (run_dir / "recipe.yaml").read_bytes()
    digest = hashlib.sha256(saved).hexdigest()
    assert (run_dir / "recipe.sha256").read_text(encoding="utf-8").strip() == digest
    assert _summary(run_dir)["recipe_sha256"] == digest
    recipe = yaml.safe_load(saved)
    assert recipe["trainer"]["max_steps"] == MAX_STEPS
    assert recipe["seeds"]["incubation_steps"] == INCUBATION
    assert recipe["policy"]["trigger"] == "periodic"


def test_saved_model_matches_the_topology(run_dir: Path) -> None:
    check_model_matches_topology(run_dir)


def check_model_matches_topology(run_dir: Path) -> None:
    """Host weights for every wrapped layer; seed tensors exactly for the slots that keep a seed."""
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    topology = json.loads((run_dir / "final" / "topology.json").read_text(encoding="utf-8"))
    seen_seed_keys: set[str] = set()
    for name, layer in topology["layers"].items():
        assert f"{name}.host.weight" in weights, name
        for index, slot in enumerate(layer["slots"]):
            prefix = f"{name}.seeds.{index}."
            keys = {k for k in weights if k.startswith(prefix)}
            if slot["state"] in ("FOSSILIZED",):
                assert keys, f"fossilized seed {name}#{index} missing from the saved model"
                assert sum(weights[k].numel() for k in keys) == slot["params"]
            else:
                assert not keys, f"{slot['state']} slot {name}#{index} still has tensors in the saved model: {keys}"
            seen_seed_keys |= keys
    stray = {k for k in weights if ".seeds." in k} - seen_seed_keys
    assert not stray, f"seed tensors of no slot in the topology: {stray}"


def test_plain_progress_has_step_lines_and_ends_with_the_summary_table(lifecycle: Result, run_dir: Path) -> None:
    lines = lifecycle.stdout.splitlines()
    steps = [(i, STEP_LINE.match(line)) for i, line in enumerate(lines)]
    steps = [(i, m) for i, m in steps if m]
    assert len(steps) >= 10, lifecycle.explain()
    assert all(int(m["max"]) == MAX_STEPS for _, m in steps)
    last_index, last = steps[-1]
    assert int(last["step"]) == MAX_STEPS
    assert any(re.match(r"^\s+step \d+: germinate \S+ in \S+#\d+$", line) for line in lines), lifecycle.explain()
    # the kernel wait before step 1 is announced, and every later step line says the pace and time left
    first_index = steps[0][0]
    assert any(re.match(r"^  compiling \d+ kernels? \(cached for later runs\)\.\.\.$", line)
               for line in lines[:first_index]), lifecycle.explain()
    assert all(re.search(r" \d+\.\d steps/s eta \d+:\d\d$", lines[i]) for i, _ in steps[1:]), lifecycle.explain()
    assert lines[last_index].endswith(" eta 0:00")
    assert "\x1b[" not in lifecycle.stdout, "escape codes in non-terminal output"
    tail = "\n".join(lines[last_index + 1:])
    for row in ("steps", "val accuracy", "test accuracy", "params initial", "params final", "seeds", "wall time"):
        assert row in tail, f"summary row {row!r} missing after the last step line\n{lifecycle.explain()}"
    assert not any(STEP_LINE.match(line) or line.startswith("  step ") for line in lines[last_index + 1:])
    # the seeds grew, so the table also says what the model scores with every one of them muted
    muted = _summary(run_dir)["seeds_muted"]
    assert _summary(run_dir)["seeds"]["fossilized"] > 0
    for split in ("val", "test"):
        row = re.search(rf"{split} accuracy, every seed muted\W+(\d\.\d{{4}})", tail)
        assert row and float(row[1]) == pytest.approx(muted[f"{split}_accuracy"], abs=5e-5), lifecycle.explain()


# --- (c) bad input: exit 2, one located line per problem, no traceback ----------------------------

def test_a_run_whose_kernels_are_all_cached_announces_no_compile(launched: Launched, lifecycle: Result) -> None:
    """The lifecycle run compiled this recipe's kernels into the workspace: the next run finds every one
    in the store and starts at once, without a "compiling" notice that would not be true."""
    r = run_esper(["train", DIGITS_CNN, "run.output_dir=runs-again", *LIFECYCLE_OVERRIDES, "trainer.max_steps=20"],
                  launched.work)
    assert r.returncode == 0, r.explain()
    assert any(STEP_LINE.match(line) for line in r.stdout.splitlines()), r.explain()
    assert "compiling" not in r.stdout and "kernels ready" not in r.stdout, r.explain()


def _user_error(r: Result, launched: Launched, lines: int) -> list[str]:
    assert r.returncode == 2, r.explain()
    assert "Traceback" not in r.stderr, r.explain()
    assert r.stdout == "", r.explain()
    assert not (launched.work / "never").exists(), "a run that failed validation left a run directory"
    errors = r.stderr.splitlines()
    assert len(errors) == lines and all(e.startswith("error: ") for e in errors), r.explain()
    return errors


def _line_of(text: str, fragment: str) -> int:
    """1-based line of the only line of ``text`` that contains ``fragment``."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(found) == 1, fragment
    return found[0]


def test_target_that_matches_nothing(launched: Launched) -> None:
    r = launched.result("bad_targets")
    (error,) = _user_error(r, launched, lines=1)
    m = LOCATED.match(error)
    assert m, r.explain()
    assert m["file"] == "bad_targets.yaml"
    assert int(m["line"]) == _line_of(BAD_TARGETS, '"features.*"')
    assert m["field"] == "seeds.targets.1"
    assert "'features.*'" in m["message"]
    for name in ("stem.conv", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.shortcut", "head"):
        assert name in m["message"], f"matchable module {name!r} not listed\n{r.explain()}"


def test_unknown_blueprint(launched: Launched) -> None:
    r = launched.result("bad_blueprint")
    (error,) = _user_error(r, launched, lines=1)
    m = LOCATED.match(error)
    assert m, r.explain()
    assert m["file"] == "bad_blueprint.yaml"
    assert int(m["line"]) == _line_of(BAD_BLUEPRINT, "no_such_blueprint")
    assert m["field"] == "seeds.blueprints.1"
    assert "no_such_blueprint" in m["message"] and "residual_conv" in m["message"]


def test_missing_recipe_file(launched: Launched) -> None:
    r = launched.result("missing_file")
    (error,) = _user_error(r, launched, lines=1)
    assert "no_such_recipe.yaml" in error and "not found" in error


def test_malformed_overrides_are_each_reported(launched: Launched) -> None:
    r = launched.result("bad_override")
    first, second = _user_error(r, launched, lines=2)
    assert "<command line>" in first and "'trainer.max_steps'" in first and "key=value" in first
    assert "<command line>" in second and "'=3'" in second


def test_resume_without_a_checkpoint_is_a_user_error(launched: Launched) -> None:
    """`resume` is real now: pointed at a directory with no checkpoint it must say so, not crash."""
    r = launched.result("resume")
    assert r.returncode != 0, r.explain()
    assert "Traceback" not in r.stderr, r.explain()
    errors = r.stderr.splitlines()
    assert errors and all(e.startswith("error: ") for e in errors), r.explain()
    assert str(launched.work / "empty") in errors[0]


# --- (d) the cache can be inspected without a traceback ----------------------------------------

def test_inspect_cache_lists_the_tiers(launched: Launched) -> None:
    r = launched.result("inspect-cache")
    assert r.returncode == 0, r.explain()
    assert "Kernel cache tiers" in r.stdout and "disk" in r.stdout, r.explain()
    assert "Traceback" not in r.stderr, r.explain()


# --- (e) an existing run directory is never overwritten ------------------------------------------

def test_existing_run_directory_is_not_overwritten(launched: Launched, run_dir: Path) -> None:
    earlier = launched.work / "runs" / "digits-cnn"
    assert (earlier / "summary.json").read_text(encoding="utf-8") == '{"earlier": true}\n'
    assert sorted(p.name for p in earlier.iterdir()) == ["summary.json"]
    # run_dir is reported as the command line gave it, relative to the directory the command ran in.
    reported = Path(_summary(run_dir)["run_dir"])
    assert (launched.work / reported).resolve() == run_dir.resolve()
    assert sorted(p.name for p in (launched.work / "runs").iterdir()) == ["digits-cnn", "digits-cnn-2"]
