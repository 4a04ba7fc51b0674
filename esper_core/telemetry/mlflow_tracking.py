"""``telemetry.mlflow_uri``: the run logged to an MLflow tracking server or store.

Parameters: the resolved recipe, flattened (``trainer.lr``, ``seeds.blueprints``...). Metrics: what
``metrics.jsonl`` holds (``loss``, ``lr``, ``params``, ``seeds_<state>``, ``val_<figure>``), at their
optimizer step. Artifacts, when the run ends: ``summary.json``, ``recipe.yaml``, ``events.jsonl``,
``metrics.jsonl`` and ``final/``. The MLflow run id is part of checkpoints, so ``esper resume``
continues the same MLflow run (a step logged after the checkpoint by the interrupted process
appears twice in MLflow's history; the run directory's files hold it once).

Only MLflow's client is needed (the ``mlflow-skinny`` distribution, the ``[mlflow]`` extra); a
``sqlite:///`` store works with it because SQLAlchemy and Alembic are Esper dependencies anyway. An
experiment created in such a store keeps its artifacts beside the database (``mlartifacts/``), not in
``./mlruns`` under whatever directory a run was started from (MLflow's default).

MLflow's client retries a failed HTTP request 7 times with a doubling backoff, and waits up to 120 s
for each answer: a server that cannot be reached held a run for about four minutes before its
tracker was switched off (and a server lost mid-run would stall the loop as long). Unless the user
set them, :data:`HTTP_BOUNDS` keep that to seconds; the run directory keeps the full record anyway.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ARTIFACTS = ("summary.json", "recipe.yaml", "events.jsonl", "metrics.jsonl")
_BATCH = 100  # MLflow's limit of parameters per log_batch call
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's own settings (read at each request), where the environment does not set them: an
unreachable server fails in about 3 s, one that never answers in about 30 s."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"lr": 0.01}}`` -> ``{"trainer.lr": "0.01"}`` (lists and scalars as text)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = str(value)
    return out


def _beside_database(uri: str) -> str | None:
    """``file://<db dir>/mlartifacts`` for a ``sqlite:///`` store, else ``None`` (the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # relative, or absolute after "////"
    return (database.resolve().parent / "mlartifacts").as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_dir: Path, run_id: str | None, recipe: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name, value in HTTP_BOUNDS.items():
            os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=uri)
        self.done = False
        if run_id is not None:  # a resume: the same MLflow run goes on
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, artifact_location=_beside_database(uri))
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags={"esper.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        params = [Param(key, value[:6000]) for key, value in flatten(recipe).items()]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _BATCH])

    def _metrics(self, row: dict[str, Any], rename: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric((rename or {}).get(k, k), float(v), stamp, row["step"]) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def logged(self, row: dict[str, Any]) -> None:
        self._metrics(row, {k: f"seeds_{k}" for k in row if k not in ("step", "loss", "lr", "params")})

    def validated(self, row: dict[str, Any]) -> None:
        self._metrics(row)

    def event(self, event: dict[str, Any]) -> None:
        """Lifecycle events are in ``events.jsonl``, logged as an artifact at the end."""

    def finished(self, run_dir: Path) -> None:
        for name in ARTIFACTS:
            self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.log_artifacts(self.run_id, str(run_dir / "final"), "final")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.done = True

    def cursor(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    def close(self) -> None:
        if not self.done:  # interrupted or failed: a resume sets it running again
            self.client.set_terminated(self.run_id, "KILLED")
