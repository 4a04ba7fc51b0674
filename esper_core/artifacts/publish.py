"""Uploading a run's artifacts after each local commit, without ever failing the run.

The trainer calls :func:`publish_checkpoint` after a checkpoint is committed (and retention applied)
and :func:`publish_run` after ``summary.json``; ``esper export`` and ``esper report`` call
:func:`publish_files` for what they wrote. Each is a no-op without ``storage.artifacts_url``.
Objects go to ``<artifacts_url>/<run directory name>/<path in the run directory>``.

A store that is down costs each request at most ``storage.artifacts_timeout_s`` times
``storage.artifacts_attempts``; the first failure prints one warning and opens a circuit breaker, so
later commits skip the store at once until ``storage.breaker_reset_s`` has passed (then one trial).
Nothing is queued in memory: ``esper sync RUN_DIR`` (:func:`sync_run`) later uploads every file whose
sha256 differs from the one the store records.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from esper_core.artifacts.objects import Location, ObjectError, ObjectStore, sha256_file
from esper_core.recipe.schema import StorageConfig

if TYPE_CHECKING:
    from esper_core.storage.guard import Breaker

log = logging.getLogger(__name__)

RUN_FILES = ("recipe.yaml", "recipe.sha256", "events.jsonl", "metrics.jsonl")
"""Files of the run itself, uploaded with every checkpoint: a resume from the store needs the recipe,
and the logs up to the checkpoint's cursor."""


def location_of(storage: StorageConfig, source: str = "<recipe>") -> Location | None:
    """The recipe's artifact location (``None`` when it has none)."""
    if not storage.artifacts_url:
        return None
    return Location.parse(storage.artifacts_url, source, "storage.artifacts_url", storage.s3_endpoint_url)


@dataclass
class Publisher:
    """One run's uploads: the store, its breaker, what this process already uploaded, one warning."""

    store: ObjectStore
    run_dir: Path
    breaker: Breaker
    uploaded: dict[str, str] = field(default_factory=dict)  # relpath -> sha256 this process uploaded
    warned: bool = False

    def upload(self, relpaths: list[str]) -> bool:
        """Upload each file (skipping ones this process already uploaded unchanged); returns whether
        every upload succeeded. Never raises for the store's failures."""
        for relpath in relpaths:
            path = self.run_dir / relpath
            if not path.is_file():
                continue
            digest = sha256_file(path)
            if self.uploaded.get(relpath) == digest:
                continue
            if not self.breaker.allow():
                return False
            try:
                self.store.put(f"{self.run_dir.name}/{relpath}", path, digest)
            except ObjectError as exc:
                self.breaker.failure()
                self._warn(str(exc))
                return False
            if self.breaker.success():
                log.info("artifact store %s is back", self.store.location.url())
            self.uploaded[relpath] = digest
        return True

    def _warn(self, reason: str) -> None:
        if self.warned:
            return
        self.warned = True
        print(f"warning: artifact store {self.store.location.url()} is unreachable ({reason}); the run goes on "
              f"locally. Upload what is missing later with: esper sync {self.run_dir}", file=sys.stderr)


_publishers: dict[Path, Publisher] = {}


def _publisher(run_dir: Path, storage: StorageConfig) -> Publisher | None:
    location = location_of(storage)
    if location is None:
        return None
    key = run_dir.resolve()
    if key not in _publishers:
        from esper_core.storage.guard import Breaker  # imports the compiler stack: only for a training run

        store = ObjectStore(location, storage.artifacts_timeout_s, storage.artifacts_attempts)
        _publishers[key] = Publisher(store, key, Breaker(1, storage.breaker_reset_s))
    return _publishers[key]


def publish_checkpoint(run_dir: Path, checkpoint: Path, storage: StorageConfig) -> None:
    """After a checkpoint's commit: its files, then ``LATEST``, then the recipe and logs."""
    publisher = _publisher(run_dir, storage)
    if publisher is None:
        return
    relative = checkpoint.relative_to(run_dir).as_posix()
    files = sorted(p.name for p in checkpoint.iterdir() if p.is_file())
    publisher.upload([f"{relative}/{name}" for name in files] + [f"{checkpoint.parent.name}/LATEST", *RUN_FILES])


def publish_run(run_dir: Path, storage: StorageConfig) -> None:
    """After ``summary.json``: the final model, the summary, the recipe and the logs. The run is over,
    so its publisher (and its breaker) is dropped."""
    publisher = _publisher(run_dir, storage)
    if publisher is None:
        return
    final = sorted(f"final/{p.name}" for p in (run_dir / "final").iterdir() if p.is_file())
    publisher.upload([*final, "summary.json", *RUN_FILES])
    _publishers.pop(run_dir.resolve(), None)


def publish_files(run_dir: Path, paths: list[Path], storage: StorageConfig) -> bool:
    """Upload the files among ``paths`` that lie inside ``run_dir`` (an export, a report); returns whether
    all were uploaded (``True`` when there is nothing to do). A failure is one warning, never an error."""
    location = location_of(storage)
    root = run_dir.resolve()
    inside = [p for p in paths if p.resolve().is_relative_to(root)]  # an export --out elsewhere stays local
    if location is None or not inside:
        return True
    store = ObjectStore(location, storage.artifacts_timeout_s, storage.artifacts_attempts)
    try:
        for path in inside:
            store.put(f"{root.name}/{path.resolve().relative_to(root).as_posix()}", path)
    except ObjectError as exc:
        print(f"warning: artifact store {location.url()} is unreachable ({exc}); upload later with: "
              f"esper sync {run_dir}", file=sys.stderr)
        return False
    return True


@dataclass(frozen=True)
class SyncResult:
    location: str
    uploaded: list[str]
    unchanged: list[str]


def sync_run(run_dir: Path, location: Location, timeout_s: float = 10.0, attempts: int = 3) -> SyncResult:
    """Upload every file of ``run_dir`` whose sha256 differs from the one the store records (or that
    the store lacks); raises :class:`ObjectError` when the store cannot be reached."""
    store = ObjectStore(location, timeout_s, attempts)
    uploaded, unchanged = [], []
    # a pointer (LATEST) goes after what it points to, so a reader never follows it to a missing object
    for path in sorted((p for p in run_dir.rglob("*") if p.is_file()), key=lambda p: (p.name == "LATEST", p)):
        relpath = path.relative_to(run_dir).as_posix()
        if any(part.startswith(".") for part in Path(relpath).parts):  # temporaries of an unfinished write
            continue
        digest = sha256_file(path)
        key = f"{run_dir.name}/{relpath}"
        if store.recorded_sha256(key) == digest:
            unchanged.append(relpath)
            continue
        store.put(key, path, digest)
        uploaded.append(relpath)
    return SyncResult(location.child(run_dir.name).url(), uploaded, unchanged)


def sync_to_store(run_dir: Path, url: str | None = None) -> SyncResult:
    """``esper sync``: :func:`sync_run` to ``url``, or to the ``storage.artifacts_url`` of the run's
    saved recipe. User errors are :class:`~esper_core.errors.EsperError` s (exit 2 without a location,
    3 for a directory that is not a run, 1 when the store cannot be reached)."""
    from esper_core.errors import ConfigError, EsperError, Problem
    from esper_core.recipe.load import load_recipe
    from esper_core.training.saved_recipe import saved_recipe_path

    saved = saved_recipe_path(run_dir)
    storage = load_recipe(saved, check_data=False).recipe.storage  # only the storage section is read
    if url is not None:
        location = Location.parse(url, "--to", endpoint_url=storage.s3_endpoint_url)
    else:
        found = location_of(storage, str(saved))
        if found is None:
            raise ConfigError(Problem(str(saved), "the run has no artifact store; name one with --to s3://BUCKET/PREFIX",
                                      field="storage.artifacts_url"))
        location = found
    try:
        return sync_run(run_dir, location)
    except ObjectError as exc:
        raise EsperError(Problem(location.url(), f"unreachable ({exc}); nothing was lost, run esper sync again later"))
