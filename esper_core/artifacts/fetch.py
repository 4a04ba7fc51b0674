"""Downloading a run (or one of its checkpoints) from the artifact store into a local cache.

``esper resume --checkpoint s3://bucket/prefix/RUN[/checkpoints/step-N]`` and
``esper export s3://bucket/prefix/RUN`` work on a local copy under ``<workspace>/remote/BUCKET/PREFIX/RUN``
(the directory keeps the run's name, so a resumed run goes on uploading to the same place). Only
what the command needs is downloaded: the run's own files (recipe, logs, summary) and either
``final/`` or one checkpoint. Every object is verified against the sha256 recorded at upload before
it is written into the cache; one that does not match is refused, naming it (exit 3), and then the
checkpoint's own manifest is verified again by the loader as for any local checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from esper_core.artifacts.objects import IntegrityError, Location, ObjectError, ObjectStore
from esper_core.errors import CheckpointError, Problem
from esper_core.recipe.schema import StorageConfig
from esper_core.redact import redacted_url

REMOTE_DIR = "remote"
_CHECKPOINT = re.compile(r"^(?P<run>.+)/checkpoints/(?P<name>step-\d{8})$")


def is_remote(target: object) -> bool:
    return str(target).startswith("s3://")


def cache_dir(workspace: str | Path | None = None) -> Path:
    """Where downloaded runs live: ``<workspace>/remote`` (``.esper/remote`` by default)."""
    return Path(workspace or StorageConfig().workspace) / REMOTE_DIR


def fetch_run(url: str, part: Literal["final", "checkpoint"], cache: Path | None = None) -> Path:
    """Download what ``part`` needs of the run at ``url``; returns the local run directory (``final``)
    or checkpoint directory (``checkpoint``). Raises :class:`CheckpointError` (exit 3) when the store is
    unreachable, holds no such run, or an object fails its sha256."""
    shown = redacted_url(url)  # the URL as given, for messages: it may hold a secret (?aws_secret_access_key=)
    location = Location.parse(url, shown)
    named = _CHECKPOINT.match(location.prefix)
    run_prefix = named.group("run") if named else location.prefix
    if not run_prefix:
        raise CheckpointError(Problem(shown, "names a bucket, not a run (s3://BUCKET/PREFIX/RUN)"))
    run = Location(location.bucket, run_prefix, location.endpoint_url, location.region)
    store = ObjectStore(run, timeout_s=10.0, attempts=3)
    local = (cache or cache_dir()) / run.bucket / run_prefix
    try:
        objects = sorted(store.list(""))
    except ObjectError as exc:
        raise CheckpointError(Problem(run.url(), f"cannot list the run in the artifact store ({exc})")) from None
    if not objects:
        raise CheckpointError(Problem(run.url(), "no run there (the artifact store holds no object under it)"))
    wanted = [o for o in objects if "/" not in o]
    if part == "final":
        wanted += [o for o in objects if o.startswith("final/")]
        target = local
    else:
        name = named.group("name") if named else _latest(store, run, local)
        wanted += [o for o in objects if o.startswith(f"checkpoints/{name}/")]
        if not any(o.startswith(f"checkpoints/{name}/") for o in objects):
            raise CheckpointError(Problem(run.url(f"checkpoints/{name}"), "no such checkpoint in the artifact store"))
        target = local / "checkpoints" / name
    for relpath in wanted:
        _download(store, run, relpath, local)
    return target


def _latest(store: ObjectStore, run: Location, local: Path) -> str:
    _download(store, run, "checkpoints/LATEST", local)
    name = (local / "checkpoints" / "LATEST").read_text(encoding="utf-8").strip()
    if not re.fullmatch(r"step-\d{8}", name):
        raise CheckpointError(Problem(run.url("checkpoints/LATEST"), f"does not name a checkpoint ({name[:40]!r})"))
    return name


def _download(store: ObjectStore, run: Location, relpath: str, local: Path) -> None:
    if any(part in ("", ".", "..") for part in relpath.split("/")):  # a key must not climb out of the cache
        raise CheckpointError(Problem(run.url(relpath), "refused: not a plain path inside the run"))
    try:
        store.get(relpath, local / relpath)
    except IntegrityError as exc:
        raise CheckpointError(Problem(run.url(relpath), f"refused: {exc}")) from None
    except ObjectError as exc:
        raise CheckpointError(Problem(run.url(relpath), f"cannot download ({exc})")) from None
