"""Where the selector's arm statistics live between runs (``policy.selector.share_across_runs``).

The interface is two calls, so the SQL asset repository can take this over without the selector
noticing: :meth:`ArmStore.load` gives the accumulated statistics per arm, :meth:`ArmStore.merge`
adds one run's statistics to them. :class:`JsonArmStore` is the implementation used until then: one
JSON file in the storage workspace, written atomically (temporary file, fsync, rename) under an
exclusive lock so two runs finishing together both count. A file that cannot be read is treated as
empty, with a warning, and replaced on the next merge: losing shared priors never fails a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

from esper_core.durable import replace_atomically
from esper_core.policy.bandits import ArmStats

log = logging.getLogger(__name__)

FORMAT = "esper-selector-arms/1"


class ArmStore(Protocol):
    def load(self) -> dict[str, ArmStats]: ...

    def merge(self, stats: Mapping[str, ArmStats]) -> None: ...


class JsonArmStore:
    """``<workspace>/selector.json``: ``{"format": ..., "arms": {arm: [n, total, squares, pulls]}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ArmStats]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            return {str(a): ArmStats.from_json(v) for a, v in data["arms"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable selector statistics %s: %s", self.path, exc)
            return {}

    def merge(self, stats: Mapping[str, ArmStats]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            arms = self.load()
            for arm, add in stats.items():
                mine = arms.setdefault(arm, ArmStats())
                mine.n += add.n
                mine.total += add.total
                mine.squares += add.squares
                mine.pulls += add.pulls
            payload = json.dumps({"format": FORMAT, "arms": {a: s.to_json() for a, s in sorted(arms.items())}},
                                 indent=1)
            replace_atomically(self.path, payload.encode("utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: the rename alone keeps the file whole
            yield
            return
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def workspace_store(workspace: str | Path) -> JsonArmStore:
    """The store of a recipe's ``storage.workspace``."""
    return JsonArmStore(Path(workspace) / "selector.json")
