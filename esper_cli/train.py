"""`esper train RECIPE [key=value ...] [--dry-run] [--json]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from esper_cli import launching
from esper_cli.console import make_console
from esper_cli.errors import reported
from esper_cli.progress import make_progress

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer

JSON_HELP = ("Print the final summary as one JSON object on stdout (progress and messages go to stderr), "
             "for scripts.")


@reported
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(None, help="Overrides such as trainer.max_steps=200 seeds.per_layer=2.",
                                          show_default=False),
    no_factories: bool = typer.Option(False, "--no-factories", help="Refuse a recipe that names code to run "
                                      "(data/model factories, a custom loss) before importing anything; also "
                                      "ESPER_ALLOW_FACTORIES=0."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the recipe, build the data and the model, and "
                                 "show the resolved recipe, the code the run would bind (file and sha256 of each "
                                 "factory module) and what would grow where (layers, slots, usable blueprints and "
                                 "their cost, budgets); writes nothing, compiles nothing."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    nproc_per_node: int | None = launching.NPROC, nnodes: str = launching.NNODES, node_rank: int = launching.NODE_RANK,
    rdzv_backend: str = launching.RDZV_BACKEND, rdzv_endpoint: str | None = launching.RDZV_ENDPOINT,
    rdzv_id: str | None = launching.RDZV_ID, rdzv_join_timeout: int = launching.RDZV_JOIN_TIMEOUT,
) -> None:
    """Train (and grow) a model as the recipe says."""
    allow = False if no_factories else None
    if dry_run:
        from esper_core.training.dry_run import dry_run as plan_of  # PyTorch loads only for commands that train

        plan = plan_of(recipe, overrides or [], allow_factories=allow)
        if as_json:
            print(json.dumps(plan, indent=2))
        else:
            print_plan(plan, make_console())
        return
    if nproc_per_node is not None:
        from esper_core.recipe.load import load_recipe

        loaded = load_recipe(recipe, overrides or [], allow)  # a bad recipe stops here (exit 2), before any rank starts
        spec = launching.launch_spec(nproc_per_node, nnodes, node_rank, rdzv_backend, rdzv_endpoint,
                                     rdzv_id or launching.rendezvous_id(loaded.recipe.run.name, loaded.resolved_yaml),
                                     rdzv_join_timeout)
        launching.relaunch(spec, ["train", str(recipe), *(overrides or []), *(["--no-factories"] if no_factories else []),
                                  *(["--json"] if as_json else [])])
    from esper_core.training.trainer import Trainer  # PyTorch loads only for commands that train

    trainer = Trainer.from_recipe(recipe, overrides or [], allow_factories=allow)
    fit_and_summarise(trainer, as_json)


def fit_and_summarise(trainer: "Trainer", as_json: bool, announce: str | None = None) -> None:
    """Train with the recipe's progress display, then print the summary: a table, or with ``as_json``
    one JSON object on stdout while progress goes to stderr (train and resume); under torchrun only
    rank 0 shows either. ``announce`` is printed once the run is really under way (its directory
    claimed, its first event recorded), not before a refusal such as a run held by another process."""
    console = Console(stderr=as_json)
    progress = make_progress(trainer.loaded.recipe.telemetry.progress, console) if trainer.leader else None

    def listen(event: dict) -> None:
        nonlocal announce
        if announce is not None and event.get("event") in ("run_start", "run_resume"):
            console.print(announce, soft_wrap=True)
            announce = None
        if progress is not None:
            progress(event)
    try:
        summary = trainer.fit(listen if trainer.leader else None)
    finally:
        if progress is not None:
            progress.close()
    if not trainer.leader:
        return
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"Run {summary['run_dir']}", soft_wrap=True)  # a path is never wrapped inside a word
        console.print(summary_table(summary))


def summary_table(summary: dict) -> Table:
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    metric = summary["metric"]
    rows = [
        ("steps", f"{summary['steps']}"),
        ("device", summary["device"]),
        (f"val {metric}", f"{summary[f'val_{metric}']:.4f}"),
        (f"test {metric}", f"{summary[f'test_{metric}']:.4f}"),
        *[(f"test {extra}", f"{summary[f'test_{extra}']:.4f}") for extra in ("r2",)  # a regression's other figure
          if extra != metric and isinstance(summary.get(f"test_{extra}"), (int, float))],
        *_muted_rows(summary, metric),
        ("params initial", f"{summary['params_initial']:,}"),
        ("params final", f"{summary['params_final']:,}"),
        ("seeds", ", ".join(f"{k} {v}" for k, v in summary["seeds"].items() if v) or "none"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if summary.get("early_stop"):
        stop = summary["early_stop"]
        rows.append(("stopped early", f"step {stop['step']} (best {stop['metric']} {stop['best']:.4f} "
                                      f"at step {stop['best_step']})"))
    if "best_step" in summary:
        last = summary["last_step"]
        rows.append(("final/ from", f"step {summary['best_step']} (best val {metric}); last step "
                                    f"{last['step']}: val {metric} {last[f'val_{metric}']:.4f}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _muted_rows(summary: dict, metric: str) -> list[tuple[str, str]]:
    """The metric with every seed muted, beside the metric with them, when the run grew anything:
    the difference is what growth bought (for a static run the two are the same figure)."""
    from esper_core.seeds.lifecycle import any_adding

    grown = any_adding(summary["seeds"])
    muted = summary.get("seeds_muted") or {}
    return [(f"{split} {metric}, every seed muted", f"{muted[f'{split}_{metric}']:.4f}")
            for split in ("val", "test") if grown and f"{split}_{metric}" in muted]


def print_plan(plan: dict[str, Any], console: Console) -> None:
    """The dry run's report: the resolved recipe (YAML up to the ``data:`` line, so it can be copied or
    parsed as it is), then the data and model, the layers, the budgets, and the code the run would bind."""
    console.print(f"# resolved recipe ({plan['recipe']}, sha256 {plan['recipe_sha256'][:12]})", markup=False,
                  highlight=False)
    console.print(plan["resolved"].rstrip(), markup=False, highlight=False, soft_wrap=True)
    data, model = plan["data"], plan["model"]
    console.print(f"\ndata: {data['source']}, input {tuple(data['input_shape'])}, {data['outputs']} outputs, "
                  f"train/val/test {data['train']}/{data['val']}/{data['test']} samples, "
                  f"{data['samples_per_step']} per optimizer step"
                  + (f" ({data['steps_per_epoch']} steps per epoch)" if data["steps_per_epoch"] else ""),
                  markup=False, highlight=False, soft_wrap=True)
    console.print(f"model: {model['arch']}, {model['params']:,} parameters; device {plan['device']}; "
                  f"run directory {plan['run_dir']} (not created)", markup=False, highlight=False, soft_wrap=True)
    table = Table(title="Wrapped layers", caption="cost: parameters / forward FLOPs per sample of one seed")
    for header in ("layer", "host", "slots", "blueprints (cost)", "unusable here"):
        table.add_column(header)
    for layer in plan["layers"]:
        usable = "\n".join(f"{b['name']} ({b['params']:,} / {b['flops']:,})" for b in layer["blueprints"]) or "none"
        unusable = "\n".join(f"{name}: {why}" for name, why in layer["unusable"].items()) or "-"
        table.add_row(layer["layer"], f"{layer['host']} {layer['in']}->{layer['out']}", str(layer["slots"]), usable,
                      unusable)
    console.print(table)
    budgets = plan["budgets"]
    start, end = budgets["growth_window_steps"]
    console.print(f"budgets: at most {budgets['max_seeds']} seeds alive, {budgets['max_germinations']} per decision, "
                  f"{budgets['max_added_params']:,} added parameters"
                  + (f", {budgets['max_added_flops']:,} added FLOPs per sample" if budgets["max_added_flops"] else "")
                  + (f", {budgets['max_latency_ms']} ms per seed" if budgets["max_latency_ms"] else "")
                  + f"; growth from step {start} to {end}; {plan['kernels']} kernels to compile or fetch",
                  markup=False, highlight=False, soft_wrap=True)
    _print_code(plan["code"], console)


def _print_code(code: dict[str, dict[str, Any]], console: Console) -> None:
    """The code the run would bind, one module a line with its file and full sha256 (comparable with
    ``sha256sum``): what a resume of the run will refuse edited, seen before the run depends on it."""
    if not code:
        console.print("\ncode the run binds: none (the recipe names no data.factory, model.factory or "
                      "task.function)", markup=False, highlight=False, soft_wrap=True)
        return
    relative = any(entry["file"] and entry["path"] != entry["file"] for entry in code.values())
    console.print("\ncode the run binds (a resume refuses it edited" + ("; paths relative to the recipe's directory"
                                                                        if relative else "") + "):",
                  markup=False, highlight=False, soft_wrap=True)
    for module, entry in code.items():
        bound = (f"{entry['path']}, sha256 {entry['sha256']}" if entry["file"] else
                 "not bound (a module of the standard library or of an installed package, versioned by its package, "
                 "or one without a source file)")
        console.print(f"  {module} ({entry['field']}): {bound}", markup=False, highlight=False, soft_wrap=True)
