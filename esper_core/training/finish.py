"""The end of a run: final evaluation, the final model and topology, the summary, the last event."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from esper_core.artifacts.publish import publish_run
from esper_core.export.final import write_final
from esper_core.policy.arm_store import workspace_store
from esper_core.telemetry.binding import artifact_digests, sign_head, summary_figures
from esper_core.training.loaders import resident
from esper_core.training.models import count_parameters

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
    with trainer.precision.autocast():
        val = task.evaluate(trainer.model, trainer.val_batches, trainer.device, world)
        test = task.evaluate(trainer.model, test_batches, trainer.device, world)
        with manager.all_muted():  # what the grown seeds are worth: the same model with every seed silent
            muted = {"val": task.evaluate(trainer.model, trainer.val_batches, trainer.device, world),
                     "test": task.evaluate(trainer.model, test_batches, trainer.device, world)}
    if not trainer.leader:
        return {"run_dir": str(trainer.run_dir), "steps": trainer.step, **{f"val_{k}": v for k, v in val.metrics.items()},
                **{f"test_{k}": v for k, v in test.metrics.items()}}
    write_final(trainer.run_dir, trainer.model.state_dict(), manager.topology(),
                {"step": trainer.step, "recipe_sha256": trainer.loaded.sha256, "recipe_dir": str(trainer.base_dir),
                 "host_model": host_model(trainer)})
    summary = {
        "run_dir": str(trainer.run_dir), "recipe_sha256": trainer.loaded.sha256, "device": str(trainer.device),
        "steps": trainer.step, "wall_time_s": round(time.perf_counter() - trainer.started, 3),
        "task": task.kind, "metric": task.metric, "higher_is_better": task.higher_is_better,
        **{f"val_{k}": v for k, v in val.metrics.items()}, **{f"test_{k}": v for k, v in test.metrics.items()},
        "seeds_muted": {f"{split}_{k}": v for split, result in muted.items() for k, v in result.metrics.items()},
        "params_initial": trainer.params_initial, "params_final": count_parameters(trainer.model),
        "seeds": manager.counts(),
        "fossilized": [{"layer": n, "slot": i, "blueprint": s.blueprint, "params": s.params, "merged": s.merged}
                       for n, layer in manager.layers.items() for i, s in enumerate(layer.slots)
                       if s.state.name == "FOSSILIZED"],
        "rollbacks": controller.governor.rollbacks,
        "kernel_wait_s": round(controller.kernel_wait_s, 3), "blocked_steps": controller.kernels.blocked,
        **({"world_size": world.size} if world is not None else {}),
    }
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
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    publish_run(trainer.run_dir, recipe.storage)
    return summary


def host_model(trainer: Trainer) -> dict[str, Any]:
    """What rebuilding the host model needs besides the recipe (recorded in final/ and checkpoints)."""
    return {"input_shape": list(trainer.data.input_shape), "num_classes": trainer.data.num_classes}
