"""A run's recipe as it ran: its saved ``recipe.yaml`` plus the overrides its resumes applied.

A run writes its resolved recipe once, as ``recipe.yaml`` (with ``recipe.sha256``), and never rewrites
it: the audit binds that file's hash to the run's first event. ``esper resume RUN trainer.max_steps=N``
(and the other overrides allowed at resume) makes the run's recipe ``recipe.yaml`` plus those
overrides, so each checkpoint and ``final/manifest.json`` record what rebuilding it takes:

- ``recipe_sha256``: the hash of the recipe in effect (the one ``run_start``/``run_resume`` name);
- ``recipe_file_sha256``: the hash of ``recipe.yaml`` itself;
- ``recipe_overrides``: every override applied at a resume so far, in order;
- ``recipe_dir``: the directory of the recipe the run was trained from, which relative paths in it
  (``data.path``, ``seeds.blueprint_dirs``) resolve against;
- ``recipe_code``: the file and sha256 of each module the recipe names code in
  (:mod:`~esper_core.training.factory_sources`), which the recipe's own hash does not cover.

Before, a checkpoint written after a resume with an override recorded only the hash of the recipe in
effect, which ``recipe.yaml`` alone no longer had: the run could not be resumed again, nor exported.
Records written before these fields existed are read as they were meant (no overrides, the file's hash
is the recipe's, relative paths from the run directory, no code to check).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_core.errors import CheckpointError, Problem
from esper_core.recipe.load import LoadedRecipe, load_recipe
from esper_core.safe_read import UnsafeInput, open_regular
from esper_core.training.factory_sources import ModuleSource, read_sources


@dataclass(frozen=True)
class RecipeRecord:
    """What a checkpoint's state or ``final/manifest.json`` records, beside the ``recipe_sha256`` of
    the recipe in effect that each already holds, to rebuild the run's recipe."""

    file_sha256: str
    overrides: tuple[str, ...]
    base_dir: Path
    code: Mapping[str, ModuleSource]

    @classmethod
    def fresh(cls, loaded: LoadedRecipe, code: Mapping[str, ModuleSource]) -> RecipeRecord:
        """A new run's: it writes ``loaded`` as its ``recipe.yaml``, with no override on top, and runs ``code``."""
        return cls(loaded.sha256, (), loaded.base_dir, code)

    def fields(self) -> dict[str, Any]:
        return {"recipe_file_sha256": self.file_sha256, "recipe_overrides": list(self.overrides),
                "recipe_dir": str(self.base_dir),
                "recipe_code": {name: source.fields() for name, source in self.code.items()}}


def saved_recipe_path(run_dir: Path) -> Path:
    """``run_dir``'s ``recipe.yaml``, checked before anything reads it: absent, the directory is no run
    (:class:`CheckpointError`, "not a run directory"); something other than a regular file there (a
    FIFO, a directory, a device) is named as what it is and never read, a FIFO would block. Links are
    followed, as a resume follows them."""
    saved = run_dir / "recipe.yaml"
    try:
        os.close(open_regular(saved, follow_links=True))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(Problem(str(run_dir), "not a run directory (no recipe.yaml)")) from None
    except UnsafeInput as exc:
        raise CheckpointError(Problem(str(saved), str(exc))) from None
    return saved


def load_saved_recipe(run_dir: Path, record: Mapping[str, Any], where: str, overrides: Sequence[str] = (),
                      allow_factories: bool | None = None, check_data: bool = True) -> tuple[LoadedRecipe, RecipeRecord]:
    """The recipe ``record`` (a checkpoint's or ``final/``'s, read from ``where``) says the run ran,
    with ``overrides`` applied on top, and what a record of it holds from now on. Raises
    :class:`CheckpointError` when ``recipe.yaml`` is missing or is not the file the run wrote."""
    saved = run_dir / "recipe.yaml"
    in_effect = record.get("recipe_overrides") or []
    if not isinstance(in_effect, list) or not all(isinstance(o, str) for o in in_effect):
        raise CheckpointError(Problem(where, "recipe_overrides is not a list of overrides"))
    effective_hash = record.get("recipe_sha256")
    # older records: the file is the recipe in effect; without any record, the hash the run wrote
    expected = record.get("recipe_file_sha256") or effective_hash or _written_hash(run_dir)
    try:  # a FIFO, a device or a directory here was reported "missing"; none is ever read (a FIFO would block)
        with os.fdopen(open_regular(saved, follow_links=True), "rb") as handle:
            digest: str | None = hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        digest = None
    except UnsafeInput as exc:
        raise CheckpointError(Problem(str(saved), str(exc))) from None
    if digest is None or (expected is not None and digest != expected):
        raise CheckpointError(Problem(str(saved), f"missing or does not match the recipe hash recorded in {where}"))
    recipe_dir = record.get("recipe_dir")
    base_dir = Path(recipe_dir) if isinstance(recipe_dir, str) else None
    ran = load_recipe(saved, in_effect, allow_factories, base_dir, check_data)
    if in_effect and effective_hash is not None and ran.sha256 != effective_hash:
        raise CheckpointError(Problem(where, f"{saved.name} with the recorded overrides {in_effect} is not the "
                                             "recipe the run recorded"))
    loaded = load_recipe(saved, [*in_effect, *overrides], allow_factories, base_dir, check_data) if overrides else ran
    code = read_sources(record.get("recipe_code"), where)
    return loaded, RecipeRecord(digest, (*in_effect, *overrides), loaded.base_dir, code)


def _written_hash(run_dir: Path) -> str | None:
    """``recipe.sha256`` as the run wrote it, for a record that names no hash."""
    path = run_dir / "recipe.sha256"
    try:
        return path.read_text(encoding="ascii").strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
