"""Experiment trackers a run also reports to: TensorBoard and MLflow (both optional extras).

A tracker receives what the run recorder already writes to ``metrics.jsonl`` and ``events.jsonl``
(training rows, validation rows, chained lifecycle events) and, once ``summary.json`` and ``final/``
exist, the finished run. It lives inside :class:`~esper_core.training.recording.RunRecorder`, so it
logs exactly what the run records, from the process that records it (rank 0 in a distributed run).

A tracker never fails or stops a run: the recorder drops one that raises, with one warning, and the
run directory keeps the full record. A missing extra, though, is a recipe error found before the
first step (:func:`check_trackers`), not a warning an hour in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from esper_core.errors import RECIPE_FIELD
from esper_core.extras import require_extra
from esper_core.recipe.schema import TelemetryConfig

Event = dict[str, Any]


class Tracker(Protocol):
    """Where a run's figures also go. ``name`` is what a warning about it says."""

    name: str

    def logged(self, row: dict[str, Any]) -> None:
        """A training row: step, loss, lr, params and seeds per lifecycle state."""

    def validated(self, row: dict[str, Any]) -> None:
        """A validation row: step and ``val_<figure>`` values."""

    def event(self, event: Event) -> None:
        """A chained event (germinate, fossilize, cull, rollback, checkpoint, ...)."""

    def finished(self, run_dir: Path) -> None:
        """The run ended: ``summary.json`` and ``final/`` are written."""

    def cursor(self) -> dict[str, Any]:
        """What a resume needs to continue this tracker's record (kept in checkpoints)."""

    def close(self) -> None:
        """Flush and release (also after an interruption or a failure)."""


def check_trackers(config: TelemetryConfig) -> None:
    """A recipe that asks for a tracker whose extra is missing stops here (exit 2, naming the field)."""
    if config.tensorboard:
        require_extra("tensorboard", "TensorBoard event files", source=RECIPE_FIELD, field="telemetry.tensorboard")
    if config.mlflow_uri:
        require_extra("mlflow", "MLflow logs", source=RECIPE_FIELD, field="telemetry.mlflow_uri")


def open_trackers(config: TelemetryConfig, run_dir: Path, cursor: dict[str, Any] | None, step: int,
                  recipe: dict[str, Any]) -> list[Tracker]:
    """The trackers the recipe asks for; ``cursor`` is the checkpoint's (a resume at ``step``) or ``None``."""
    trackers: list[Tracker] = []
    if config.tensorboard:
        from esper_core.telemetry.tensorboard import TensorBoardTracker

        # the checkpoint's step was logged before the checkpoint: what comes after it is logged again
        trackers.append(TensorBoardTracker(run_dir, step + 1 if cursor is not None else None))
    if config.mlflow_uri:
        from esper_core.telemetry.mlflow_tracking import MlflowTracker

        trackers.append(MlflowTracker(config.mlflow_uri, config.mlflow_experiment, run_dir,
                                      (cursor or {}).get("mlflow_run_id"), recipe))
    return trackers
