"""The state of a whole ``esper train`` run, for checkpoints and for the governor's snapshots.

One function pair serves both, so there is a single definition of "the state of a run": model
weights, optimizer state by parameter name, the growth controller's state (seed topology first),
every RNG and the trainer's own figures. A checkpoint adds what a snapshot must not hold: the data
position (a rollback keeps moving through the data, skipping the batches that went bad), the
governor (whose own snapshot would otherwise nest), the lengths of the log files, and what the run
has seen at validations so far (early stopping's count and the best model: a rollback returns to
the last validation, after which both were already up to date).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper_core.growth import optimizer as optim
from esper_core.growth.state import State, rng_state, set_rng_state

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer


def capture(trainer: Trainer, checkpoint: bool) -> State:
    """The run's state between two steps. Tensors are the live ones: a checkpoint's
    :func:`~esper_core.growth.state.split` copies them, and a snapshot goes through
    :func:`~esper_core.growth.state.cpu_copy`."""
    state: State = {
        "model": dict(trainer.model.state_dict()),
        "optimizer": optim.export_state(trainer.optimizer, trainer.model),
        "controller": trainer.controller.state_dict(governor=checkpoint),
        "rng": rng_state(),
        "trainer": {"last_val": trainer.last_val, "scaler": trainer.precision.state_dict()},
    }
    if checkpoint:
        state["trainer"]["wall_time_s"] = trainer.wall_time_s()  # a resume's summary adds its own to it
        state["data"] = trainer.sampler.position()
        state["logs"] = trainer.recorder.cursor()
        state["early_stopping"] = trainer.stopping.state_dict()
        state["best"] = trainer.best.state_dict()
    return state


def restore(trainer: Trainer, state: State) -> None:
    """Put the run back into a captured state: topology first (the controller rebuilds seeds and their
    optimizer groups), then weights, optimizer state, RNGs and the trainer's figures."""
    trainer.controller.load_state_dict(state["controller"])
    trainer.model.load_state_dict(state["model"], strict=True)
    optim.import_state(trainer.optimizer, trainer.model, state["optimizer"])
    set_rng_state(state["rng"])
    trainer.last_val = state["trainer"]["last_val"]
    trainer.precision.load_state_dict(state["trainer"].get("scaler") or {})
    if "data" in state:
        trainer.earlier_wall_time_s = float(state["trainer"].get("wall_time_s") or 0.0)
        trainer.sampler.seek(**state["data"])
        trainer.stopping.load_state_dict(state.get("early_stopping") or {"best": None, "best_step": None, "wait": 0})
        trainer.best.load_state_dict(state.get("best") or {})
