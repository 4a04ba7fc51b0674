"""What a checkpoint's content must satisfy before a resume uses it.

The store verifies bytes (every file against the manifest's sha256) before anything is parsed; this
module checks meaning: a rehashed manifest can carry any JSON. The run state must have the expected
shape, a step that is a plausible count, a data position of non-negative integers, and log cursors
that do not point past the end of the logs on disk (a resume truncates the logs to them). Anything
else (foreign tensors, a topology for other layers, a missing optimizer) surfaces while restoring,
and is turned into the same kind of refusal: exit 3, naming the checkpoint, never a traceback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from esper_core.errors import CheckpointError, Problem

_INT_LIMIT = 2**53  # beyond what a float64 (JSON's number) counts exactly: no real counter gets there


def _integer(value: Any, low: int = 0, high: int = _INT_LIMIT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_run_state(state: Any, run_dir: Path, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` (the checkpoint's JSON ``run`` part) is sound."""

    def fail(message: str) -> CheckpointError:
        return CheckpointError(Problem(where, message))

    if not isinstance(state, dict):
        raise fail("state.json holds no run state")
    for key in ("model", "optimizer", "controller", "rng", "trainer", "data", "logs"):
        if not isinstance(state.get(key), dict):
            raise fail(f"state.json has no {key!r} section")
    topology = state["controller"].get("topology")
    if not isinstance(topology, dict) or not _integer(topology.get("step")):
        raise fail("state.json: the step must be a non-negative integer")
    data = state["data"]
    if set(data) != {"epoch", "offset"} or not all(_integer(v) for v in data.values()):
        raise fail("state.json: the data position must be non-negative integers 'epoch' and 'offset'")
    logs = state["logs"]
    for key, filename in (("events_bytes", "events.jsonl"), ("metrics_bytes", "metrics.jsonl")):
        path = run_dir / filename
        size = path.stat().st_size if path.is_file() else -1
        if not _integer(logs.get(key)) or logs[key] > size:
            raise fail(f"state.json: logs.{key} ({logs.get(key)!r}) points past the end of {filename} "
                       f"({max(size, 0)} bytes)")
    if not _integer(logs.get("events_seq")) or not isinstance(logs.get("events_prev"), str):
        raise fail("state.json: the event log cursor is malformed")
    wall = state["trainer"].get("wall_time_s", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not 0 <= wall < 1e10:
        raise fail("state.json: trainer.wall_time_s must be a non-negative number of seconds")
    last_val = state["trainer"].get("last_val")
    if last_val is not None and not (isinstance(last_val, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in last_val.items())):
        raise fail("state.json: trainer.last_val must map metric names to numbers")


@contextmanager
def refusing(where: str) -> Iterator[None]:
    """Turn any failure to restore a (verified, well-formed) state into a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's load errors put their detail on the lines after the first
        message = " ".join(lines)[:400] if lines else type(exc).__name__
        raise CheckpointError(Problem(where, f"does not fit this run's model and recipe: {message}")) from None



def check_world_size(manifest: dict[str, Any], where: str) -> None:
    """Refuse to resume with another number of ranks than the checkpoint's run had (a checkpoint
    without the field was written by a single process). The data position, the per-rank batch and
    the reductions of the growth signals all depend on it, so a continuation would not be the run
    that was checkpointed."""
    recorded = manifest.get("world_size", 1)
    current = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if not _integer(recorded, 1):
        raise CheckpointError(Problem(where, f"world_size must be a positive integer, not {recorded!r}"))
    if recorded != current:
        how = (f"esper resume --nproc-per-node {recorded} --checkpoint RUN" if recorded > 1
               else "esper resume --checkpoint RUN (one process)")
        raise CheckpointError(Problem(where, f"the run was checkpointed by {recorded} rank(s) and this resume has "
                                      f"{current}: resume with the same world size ({how})"))
