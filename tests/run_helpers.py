"""Helpers shared by the tests: a finished run, `esper report` in-process, the event-log rewrites a
forger (or the trainer's run_end contract) makes, a run copy rewound to one of its checkpoints, and a
user's own training loop with growth."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from torch import nn
from typer.testing import CliRunner, Result

from esper_cli.main import app
from esper_cli.report import report
from esper_core import Evaluation, GrowthController, Trainer
from esper_core.checkpoints import store

MIRRORED_RECIPE = """\
run: {{name: bound, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
seeds: {{targets: ["type:Linear"], exclude: [head], per_layer: 1, blueprints: [lowrank_adapter], rank: 4,
        incubation_steps: 10, blend_steps: 10, probation_steps: 5, fossilize_margin: -1.0}}
policy: {{trigger: periodic, period_steps: 20, growth_window: [0.05, 0.5], max_seeds: 2}}
trainer: {{max_steps: 60, lr: 0.01, eval_every: 10, log_every: 10}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}"}}
"""
"""A small growing run whose asset repository (SQLite) lives in ``{workspace}``; format it in."""

_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_app.command("report")(report)


@_app.callback()
def _group() -> None:
    """Keep `report` a subcommand, as in `esper`."""


def esper(*args: str | Path) -> Result:
    """``esper ARGS`` in-process (the CLI's own Typer app), every argument passed as a string."""
    return CliRunner().invoke(app, [str(a) for a in args])


def esper_report(*args: str | Path) -> Result:
    return CliRunner().invoke(_app, ["report", *map(str, args)])


def finished_run(root: Path, recipe: str) -> Path:
    """Train ``recipe`` under ``root`` and return its run directory."""
    (root / "recipe.yaml").write_text(recipe, encoding="utf-8")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; two threads on a loaded two-core runner spin against each other
    try:
        summary = Trainer.from_recipe(root / "recipe.yaml", [f"run.output_dir={root / 'runs'}"]).fit()
    finally:
        torch.set_num_threads(before)
    return Path(summary["run_dir"])


def dumps_record(record: dict) -> str:
    """A record serialised exactly as the trainer writes event lines."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)


def rechain(run: Path, records: list[dict], key: bytes | None = None) -> None:
    """Write ``records`` as the run's whole event log with every ``prev``, ``seq`` and the summary's
    head recomputed (and re-signed with ``key``): a forger who rewrites the chain consistently."""
    from esper_core.telemetry.binding import sign_head
    from esper_core.telemetry.jsonl import GENESIS

    prev, lines = GENESIS, []
    for seq, record in enumerate(records):
        line = dumps_record(record | {"seq": seq, "prev": prev})
        lines.append(line)
        prev = hashlib.sha256(line.encode("utf-8")).hexdigest()
    (run / "events.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    summary["events_head"] = prev
    summary.pop("events_head_signature", None)
    if key is not None:
        summary["events_head_signature"] = sign_head(prev, key)
    (run / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines()]


def finish_per_contract(run: Path, key: bytes | None = None) -> None:
    """Make a run's ``run_end`` what the trainer will record (issue 11 item 8's contract): the final
    artifacts' digests and the summary's figures, with the head re-anchored and signed with ``key``.

    Until the trainer writes these itself, this is how tests obtain a run that follows the contract;
    it recomputes the last record's hash only, exactly as the trainer does when it writes ``run_end``.
    """
    from esper_core.telemetry.binding import artifact_digests, summary_figures

    records = records_of(run)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert records[-1]["event"] == "run_end"
    records[-1] |= {"artifacts": artifact_digests(run), "summary": summary_figures(summary)}
    rechain(run, records, key)


def copy_at(run_dir: Path, parent: Path, step: int) -> Path:
    """A copy of ``run_dir`` under ``parent`` whose latest checkpoint is the one of ``step`` (the later
    ones removed), ready for ``Trainer.resume(copy)``: a resume compared against the whole run."""
    copy = parent / run_dir.name
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoints" / store.checkpoint_name(step)
    for later in (copy / "checkpoints").glob("step-*"):
        if later.name > checkpoint.name:
            shutil.rmtree(later)
    (copy / "checkpoints" / store.LATEST).write_text(checkpoint.name + "\n")
    return copy


def accuracy_on(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], Evaluation]:
    """A user's ``evaluate`` for GrowthController: accuracy (and cross-entropy) on ``x``, ``y``."""
    def evaluate(model: nn.Module) -> Evaluation:
        with torch.no_grad():
            out = model(x)
        correct = (out.argmax(1) == y).double()
        return Evaluation(float(correct.mean()), True, "accuracy", float(F.cross_entropy(out, y)), correct)
    return evaluate


def own_loop(model: nn.Module, optimizer: torch.optim.Optimizer, growth: GrowthController, x: torch.Tensor,
             y: torch.Tensor, steps: int, evaluate: Callable[[nn.Module], Evaluation], batch: int = 32) -> None:
    """``steps`` steps of a user's classification loop over ``x``, ``y`` in order, validating every 5."""
    for step in range(steps):
        start = step * batch % len(x)
        loss = F.cross_entropy(model(x[start:start + batch]), y[start:start + batch])
        optimizer.zero_grad()
        loss.backward()
        growth.after_backward()
        optimizer.step()
        growth.after_step(loss)
        if growth.step % 5 == 0:
            growth.after_validation(evaluate(model))
