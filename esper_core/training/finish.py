"""The end of a run: final evaluation, the final model and topology, the summary, the last event.

With ``checkpoint.keep_best`` the model of the best validation is what ``final/`` holds: it is
written from its own weights and topology, then loaded back from ``final/`` (as ``load_run`` would)
and evaluated, so the summary's figures are those of the model a user gets; the last step's figures
are reported beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from esper_core.artifacts.publish import publish_run
from esper_core.durable import replace_atomically
from esper_core.export.final import write_final
from esper_core.export.load import open_run
from esper_core.growth.evaluation import Evaluation
from esper_core.policy.arm_store import workspace_store
from esper_core.telemetry.binding import artifact_digests, sign_head, summary_figures
from esper_core.training.loaders import EvalBatches, resident
from esper_core.training.models import count_parameters
from esper_core.training.run_files import check_run_files, host_model
from esper_core.seeds.manager import SeedManager

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer


def finish_run(trainer: Trainer) -> dict[str, Any]:
    """Write ``final/`` and ``summary.json`` and record ``run_end``; returns the summary. Under
    torchrun every rank evaluates its shard (the figures are the whole sets') and only rank 0 writes."""
    assert trainer.run_dir is not None
    recipe = trainer.loaded.recipe
    controller, manager = trainer.controller, trainer.manager
    if recipe.policy.selector.share_across_runs and trainer.leader:
        controller.policy.selector.share(workspace_store(recipe.storage.workspace))
    task, world = trainer.task, trainer.world
    test_batches = trainer.eval_batches(trainer.shard(resident(trainer.data.test, trainer.device), "test"))
    last = _results(trainer, trainer.model, manager, test_batches)
    trainer.best.observe(trainer.step, last.val, trainer.model, manager)  # the last step may be the best
    best = trainer.best.best
    if not trainer.leader:
        return {"run_dir": str(trainer.run_dir), "steps": trainer.step, **last.figures()}
    trainer.recorder.check_logs()  # a log swapped while the run wrote it: stop before the results claim it
    # A directory (or a link, a FIFO) made where summary.json or a file of final/ belongs while the run trained
    # would fail the rename that writes it, after run_end: refused here, before anything claims the results.
    check_run_files(trainer.run_dir)
    info = {"recipe_sha256": trainer.loaded.sha256,
            **trainer.recipe_record.fields(),
            "host_model": host_model(trainer)}
    if best is None or best.step == trainer.step:
        write_final(trainer.run_dir, trainer.model.state_dict(), manager.topology(), {"step": trainer.step, **info})
        final = last
    else:  # one process only: keep_best is refused under torchrun (the evaluation would be collective)
        write_final(trainer.run_dir, best.model, best.topology, {"step": best.step, **info})
        kept = open_run(trainer.run_dir)
        final = _results(trainer, kept.model.to(trainer.device), kept.manager, test_batches)
    val, test = final.val, final.test
    summary = {
        "run_dir": str(trainer.run_dir), "recipe_sha256": trainer.loaded.sha256, "device": str(trainer.device),
        "steps": trainer.step, "wall_time_s": round(trainer.wall_time_s(), 3),
        "task": task.kind, "metric": task.metric, "higher_is_better": task.higher_is_better,
        **final.figures(),
        "params_initial": trainer.params_initial,
        "rollbacks": controller.governor.rollbacks,
        "kernel_wait_s": round(controller.kernel_wait_s, 3), "blocked_steps": controller.kernels.blocked,
        "early_stop": {k: v for k, v in trainer.stopped_early.items() if k != "event"} if trainer.stopped_early else None,
        **({"world_size": world.size} if world is not None else {}),
    }
    if trainer.best.enabled:
        summary["best_step"] = best.step if best is not None else trainer.step
        summary["last_step"] = {"step": trainer.step, **{k: v for k, v in last.figures().items()
                                                         if k.startswith(("val_", "test_", "params_"))}}
    # The last chained event binds the run's results: the final artifacts by sha256 and every figure of
    # the summary, so editing either afterwards fails `esper report --verify`; then the head is signed.
    trainer.recorder.record({"event": "run_end", "step": trainer.step, "metric": task.metric,
                             f"val_{task.metric}": val.metric, f"test_{task.metric}": test.metric,
                             "params": summary["params_final"], "artifacts": artifact_digests(trainer.run_dir),
                             "summary": summary_figures(summary)})
    summary["events_head"] = trainer.recorder.events.prev
    signature = sign_head(summary["events_head"])
    if signature is not None:
        summary["events_head_signature"] = signature
    trainer.recorder.mirror(lambda repo: repo.finish_run(trainer.recorder.run_id, "finished"))
    replace_atomically(trainer.run_dir / "summary.json", json.dumps(summary, indent=2).encode("utf-8"))
    trainer.recorder.finished(trainer.run_dir)
    publish_run(trainer.run_dir, recipe.storage)
    return summary


@dataclass(frozen=True)
class _Results:
    """One model's final figures: validation, test, the same with every seed muted, and its seeds."""

    val: Evaluation
    test: Evaluation
    muted: dict[str, Evaluation]
    params: int
    manager: SeedManager

    def figures(self) -> dict[str, Any]:
        manager = self.manager
        return {
            **{f"val_{k}": v for k, v in self.val.metrics.items()}, **{f"test_{k}": v for k, v in self.test.metrics.items()},
            "seeds_muted": {f"{split}_{k}": v for split, result in self.muted.items() for k, v in result.metrics.items()},
            "params_final": self.params, "seeds": manager.counts(),
            "fossilized": [{"layer": n, "slot": i, "blueprint": s.blueprint, "params": s.params, "merged": s.merged}
                           for n, layer in manager.layers.items() for i, s in enumerate(layer.slots)
                           if s.state.name == "FOSSILIZED"],
        }


def _results(trainer: Trainer, model: nn.Module, manager: SeedManager, test_batches: EvalBatches) -> _Results:
    """Under torchrun every rank evaluates its shard and the figures are the whole sets'."""
    task, device, world = trainer.task, trainer.device, trainer.world
    with trainer.precision.autocast():
        val = task.evaluate(model, trainer.val_batches, device, world)
        test = task.evaluate(model, test_batches, device, world)
        with manager.all_muted():  # what the grown seeds are worth: the same model with every seed silent
            muted = {"val": task.evaluate(model, trainer.val_batches, device, world),
                     "test": task.evaluate(model, test_batches, device, world)}
    return _Results(val, test, muted, count_parameters(model), manager)
