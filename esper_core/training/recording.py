"""Run recording: everything a run writes about itself while it trains.

One object receives every event (from the growth controller, the trainer and the anomaly detector)
and sends it to each place it belongs: the hash-chained ``events.jsonl``, the asset repository's
``events`` table (through the SQL tier's deadline and breaker), the Prometheus metrics, the
experiment trackers the recipe asks for (TensorBoard, MLflow: :mod:`esper_core.telemetry.trackers`)
and the progress listeners. Under torchrun only rank 0's recorder writes (``writes``): the other ranks
take the same events, for their own Prometheus metrics, and write no file, open no tracker, mirror
nothing and tell no listener. Listeners receive event dicts (lifecycle events as recorded, and ``progress``
events carrying the latest figures), never pre-formatted strings: how to show them is the caller's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esper_core.compiler.store import KernelStore
from esper_core.errors import RECIPE_FIELD, CheckpointError, ConfigError, Problem
from esper_core.recipe.checks import dangling_link
from esper_core.recipe.schema import TelemetryConfig
from esper_core.seeds.manager import Event
from esper_core.telemetry.jsonl import EventLog, JsonlWriter
from esper_core.telemetry.run import RunTelemetry
from esper_core.telemetry.trackers import Tracker, check_trackers, open_trackers

Listener = Callable[[Event], None]


class RunRecorder:
    """See the module docstring. ``step()`` says the current optimizer step (for telemetry);
    ``seed_counts()`` the number of slots per lifecycle state; ``writes`` is False on the ranks other
    than 0 of a distributed run, whose ``rank`` and ``local_rank`` telemetry takes for its label and port."""

    def __init__(self, config: TelemetryConfig, store: KernelStore, step: Callable[[], int],
                 seed_counts: Callable[[], dict[str, int]], writes: bool = True, rank: int | None = None,
                 local_rank: int = 0) -> None:
        check_trackers(config)
        self.config = config
        self.writes = writes
        self.store = store
        self.step = step
        self.trackers: list[Tracker] = []
        self.telemetry = RunTelemetry(config, self.record, seed_counts, rank=rank, local_rank=local_rank)
        self.listeners: list[Listener] = []
        self.events: EventLog | None = None
        self.metrics: JsonlWriter | None = None
        self.run_id = ""
        self._mirror_failed = False

    def open_logs(self, run_dir: Path) -> None:
        """Open ``events.jsonl`` and ``metrics.jsonl`` for appending, writing nothing yet. Each is refused
        (exit 3, naming it) where a link, a FIFO or a file with other names stands, and both are opened
        before either is cut or anything else of the run is changed, so a refusal leaves the run as it was."""
        if not self.writes or self.events is not None:
            return
        events = EventLog(run_dir / "events.jsonl")
        try:
            self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        except BaseException:
            events.close()
            raise
        self.events = events

    def open(self, run_dir: Path, cursor: dict[str, Any] | None, run_id: str, recipe: dict[str, Any]) -> None:
        """Open the run's logs (:meth:`open_logs`, unless already open) and trackers (``recipe``: the
        resolved recipe, for their parameters); a resume first cuts the logs back to the checkpoint's
        ``cursor``, through the descriptors that were checked, so nothing after the checkpoint is written twice."""
        self.run_id = run_id
        if not self.writes:
            return
        self.open_logs(run_dir)
        assert self.events is not None and self.metrics is not None
        if cursor is not None:
            self.events.cut(cursor["events_bytes"])
            self.metrics.cut(cursor["metrics_bytes"])
            self.events.seq, self.events.prev = cursor["events_seq"], cursor["events_prev"]
        try:
            self.trackers = open_trackers(self.config, run_dir, cursor, self.step(), recipe)
        except Exception as exc:  # an unreachable tracking server, a refused store: the run goes on
            print(f"warning: experiment tracking is off for this run ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); the run directory keeps the full record",
                  file=sys.stderr)

    def cursor(self) -> dict[str, Any]:
        """Where the run's logs end now (a resume truncates them here): the sizes of the files written,
        not of whatever their paths name now (a link swapped in would be followed by a ``stat``)."""
        assert self.events is not None and self.metrics is not None
        cursor = {"events_bytes": self.events.size, "events_seq": self.events.seq,
                  "events_prev": self.events.prev, "metrics_bytes": self.metrics.size}
        for tracker in self.trackers:
            cursor |= tracker.cursor()
        return cursor

    def check_logs(self) -> None:
        """Refuse (exit 3, naming it) to go on when a log's path no longer names the file this run writes:
        something was swapped in while the run was writing it, and what the run logged since went to a
        file no longer in the run. Called before a checkpoint or the run's results are written, so the run
        stops with its last good checkpoint intact rather than committing one that counts the wrong log."""
        for log in (self.events, self.metrics):
            if not self.writes or log is None:
                continue
            now = log.replaced()
            if now is not None:
                raise CheckpointError(Problem(str(log.path), f"replaced while the run was writing it (now {now} "
                                              "stands there): the run stopped before writing anything more; its "
                                              "last checkpoint is intact; restore the file and resume, or train "
                                              "again"))

    # --- what comes in ----------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """A chained event: event log, repository mirror, telemetry, listeners."""
        if self.writes:
            assert self.events is not None, "the run's logs are not open"
            self.events.append(event)
            line = self.events.last_line
            self.mirror(lambda repo: repo.append_event(self.run_id, line))
        self.telemetry.on_event(event)
        self._track("event", event)
        self.notify(event)

    def compiled(self, seconds: float, ok: bool) -> None:
        """A background kernel compile finished (reported from the training thread)."""
        self.telemetry.compiled(self.step(), seconds, ok)

    def logged(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row of the training loss and the run's size."""
        if self.writes:
            assert self.metrics is not None
            self.metrics.write(row)
        self.telemetry.logged(row)
        self._track("logged", row)
        if self.telemetry.metrics is not None:  # the cache's counters feed the Prometheus metrics only
            self.telemetry.cache_counts(self.store.stats()["tiers"])

    def validated(self, row: dict[str, Any], loss: float, metric: str, value: float) -> None:
        if self.writes:
            assert self.metrics is not None
            self.metrics.write(row)
        self.telemetry.validated(loss, metric, value)
        self._track("validated", row)

    def finished(self, run_dir: Path) -> None:
        """The run's final files are written: trackers log them (MLflow artifacts)."""
        self._track("finished", run_dir)

    def _track(self, method: str, argument: Any) -> None:
        """Call ``method`` of every tracker; one that fails is dropped with one warning."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(argument)
            except Exception as exc:  # disk full, a server gone: never the run's failure
                self.trackers.remove(tracker)
                print(f"warning: {tracker.name} logging stopped ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); the run directory keeps the full record",
                      file=sys.stderr)

    def notify(self, event: Event) -> None:
        """Tell the listeners (not chained: progress reports and notices go only here)."""
        if not self.writes:
            return
        for listener in self.listeners:
            listener(event)

    # --- the asset repository ---------------------------------------------------------------------

    def mirror(self, action: Callable[[Any], object]) -> None:
        """Write to the asset repository through the SQL tier's deadline and circuit breaker. A
        repository that is down, slow or refusing never fails the run: events.jsonl stays complete."""
        sql = self.store.tier("sql")
        if sql is None or not self.writes:
            return
        try:
            sql.guard.call(action, sql.repository)
        except Exception as exc:  # TierUnavailable or a refusal: said once, the run goes on
            if not self._mirror_failed:
                self._mirror_failed = True
                print(f"warning: asset repository not updated ({type(exc).__name__}: {exc}); "
                      f"the run directory keeps the full record", file=sys.stderr)

    def close(self) -> None:
        self.telemetry.stop()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # as in _track: closing a tracker never fails the run
                print(f"warning: {tracker.name} did not close cleanly ({type(exc).__name__})", file=sys.stderr)
        self.trackers = []
        if self.events is not None:
            self.events.close()
        if self.metrics is not None:
            self.metrics.close()


def fresh_run_dir(base: Path) -> Path:
    """``runs/NAME``, or ``runs/NAME-2``, ``-3``... so an earlier run's results are never overwritten.
    A parent that is not a usable directory is the recipe's ``run.output_dir`` at fault."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    try:
        candidate.mkdir(parents=True)
    except OSError as exc:  # beyond what check_output_dir can foresee: a full disk, a race, a link at NAME-2
        why = dangling_link(candidate) or f"{candidate}: {exc.strerror or exc}"
        raise ConfigError(Problem(RECIPE_FIELD, f"cannot create the run directory: {why}",
                                  field="run.output_dir")) from None
    return candidate


def progress_event(step: int, max_steps: int, loss: float | None, metric: str, val: dict[str, float] | None,
                   params: int, seeds: dict[str, int], started: float) -> Event:
    """The ``progress`` event listeners get every log step and after every validation: ``val`` holds
    the last validation's figures, ``metric`` names the task's."""
    return {"event": "progress", "step": step, "max_steps": max_steps, "loss": loss, "metric": metric, "val": val,
            "params": params, "seeds": seeds, "elapsed_s": time.perf_counter() - started}
