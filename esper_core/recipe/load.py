"""Load a recipe: YAML file + command-line overrides -> validated ``Recipe``, or one ``ConfigError``.

All problems are collected before anything is raised (a run that fails on the fifth typo after
four restarts wastes the user's afternoon). The result carries the fully resolved recipe as YAML
and its SHA-256, so a run can save exactly what it ran with and a resume can prove it is the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from esper_core.errors import CONTROLLER_FIELD, RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.diagnostics import Locator, validation_problems
from esper_core.recipe.overrides import COMMAND_LINE, apply_overrides
from esper_core.recipe.schema import Recipe
from esper_core.recipe.yaml_source import read_yaml_file
from esper_core.safe_read import UnsafeInput, open_regular

DATA_SUFFIXES = (".npz", ".csv")

_IMPORTING_FROM: ContextVar[Path | None] = ContextVar("esper_recipe_directory", default=None)


def importing_from() -> Path | None:
    """The recipe directory :meth:`LoadedRecipe.importable` put on ``sys.path`` for the running block,
    so a factory that cannot be imported names the directory searched: for a resume that is the
    directory of the recipe the run was trained from, not that of the run's copy the error points at."""
    return _IMPORTING_FROM.get()


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where it came from.

    ``resolved_yaml`` has every default filled in; ``sha256`` is the hex digest of its UTF-8 bytes.
    Paths inside ``recipe`` stay as written: use :func:`resolve_relative` to locate them against
    ``base_dir``, the recipe file's directory, or for a run's saved copy the directory of the recipe
    the run was trained from (the run records it as ``recipe_dir``).
    """

    recipe: Recipe
    path: Path
    resolved_yaml: str
    sha256: str
    locator: Locator = field(repr=False, compare=False)
    base_dir: Path = field(compare=False)

    def locate(self, field_path: str, message: str) -> Problem:
        """A problem found after loading (a target that matches nothing, an unknown blueprint),
        placed at the line of ``field_path`` in the file, or at the override that set it."""
        return self.locator.problem(tuple(field_path.split(".")), message)

    @contextmanager
    def located(self) -> Iterator[None]:
        """Re-raise the recipe-field problems code without the file found (``RECIPE_FIELD`` source, or
        the growth controller's ``CONTROLLER_FIELD``) at their line in this recipe; other problems pass
        unchanged. A problem with the growth targets also says what of the model explains it
        (:meth:`ModelConfig.growth_note`): the code that matched the patterns saw modules, not the
        recipe that made them."""
        try:
            yield
        except ConfigError as exc:
            raise ConfigError([self.locate(p.field, self._with_growth_note(p.field, p.message))
                               if p.source in (RECIPE_FIELD, CONTROLLER_FIELD) and p.field else p
                               for p in exc.problems]) from None

    @contextmanager
    def importable(self) -> Iterator[None]:
        """The recipe's own code (``data.factory``, ``model.factory``, ``task.function``) importable from
        its directory while the block runs, as it is from the working directory under ``python -m``: the
        ``esper`` command puts neither on ``sys.path``, so a factory module kept beside the recipe was
        "No module named ..." in training while ``load_run`` and ``esper export`` found it there. Only
        for the block: a library call leaves ``sys.path`` as it found it."""
        directory = str(self.base_dir)
        added = directory not in sys.path
        if added:
            sys.path.insert(0, directory)
        token = _IMPORTING_FROM.set(self.base_dir)
        try:
            with self.located():  # load_run and export call the factories outside the trainer's located()
                yield
        finally:
            _IMPORTING_FROM.reset(token)
            if added and directory in sys.path:
                sys.path.remove(directory)

    def _with_growth_note(self, field_path: str, message: str) -> str:
        note = self.recipe.model.growth_note() if field_path.startswith(("seeds.targets", "seeds.exclude")) else None
        return f"{message} ({note})" if note else message


def load_recipe(path: str | Path, overrides: Sequence[str] = (), allow_factories: bool | None = None,
                base_dir: Path | None = None, check_data: bool = True) -> LoadedRecipe:
    """Read, override and validate a recipe; raise ``ConfigError`` listing every problem found.

    ``allow_factories=False`` (default: ``ESPER_ALLOW_FACTORIES``, on unless ``0``) refuses a recipe
    that names user code (:data:`FACTORY_FIELDS`); loading never imports it either way.

    Relative paths in the recipe resolve against ``base_dir`` (default: the recipe file's directory).
    A run's saved ``recipe.yaml`` sits in the run directory, so whoever reloads it passes the
    ``recipe_dir`` the run recorded; resolved against the run directory, ``data.path: mine.npz``
    named a file that never existed and ``esper resume`` refused the run. ``check_data`` checks that
    a ``source: file`` data file exists now, before minutes of work; commands that read only other
    sections of a saved run's recipe (export, report, sync) turn it off, and building the data reports
    a missing file anyway."""
    source = str(path)
    resolved = Path(path).expanduser().resolve()
    base = resolved.parent if base_dir is None else Path(base_dir)
    document = read_yaml_file(Path(path).expanduser(), source)  # as named: /dev/stdin resolves to no file
    data, applied = apply_overrides(document.data, overrides)
    locator = Locator(source, document.lines, applied)
    problems: list[Problem] = []
    if not (factories_allowed() if allow_factories is None else allow_factories):
        problems.extend(factory_problems(data, locator))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, locator))
    data_problem = _data_file_problem(data.get("data"), base) if check_data else None
    if data_problem is not None:
        problems.append(locator.problem(("data", "path"), data_problem))
    if problems:
        raise ConfigError(sorted(problems, key=_reading_order))
    text = yaml.safe_dump(recipe.model_dump(), sort_keys=False, allow_unicode=True)
    return LoadedRecipe(recipe, resolved, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), locator, base)


FACTORY_FIELDS = (("data", "factory"), ("model", "factory"), ("task", "function"))
"""Recipe fields that may name user code as ``package.module:function``."""
ALLOW_FACTORIES_ENV = "ESPER_ALLOW_FACTORIES"
_CODE_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def factories_allowed() -> bool:
    """``ESPER_ALLOW_FACTORIES``: unset or ``1`` allows factories, ``0`` refuses them."""
    value = os.environ.get(ALLOW_FACTORIES_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(Problem(ALLOW_FACTORIES_ENV, f"must be 1 or 0 (got {value!r})"))


def factory_problems(data: Any, locator: Locator) -> list[Problem]:
    """One problem per field of :data:`FACTORY_FIELDS` that names code, found in the raw data (before
    validation, so a recipe is refused whatever else is wrong with it)."""
    problems = []
    for section, key in FACTORY_FIELDS:
        value = data.get(section) if isinstance(data, dict) else None
        value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and (key == "factory" or _CODE_REFERENCE.match(value)):
            problems.append(locator.problem((section, key), f"names user code ({value!r}) and factories are not "
                                            f"allowed here ({ALLOW_FACTORIES_ENV}=0 or --no-factories): a recipe "
                                            "with a factory is a program, run it only if you trust its author"))
    return problems


def resolve_relative(loaded: LoadedRecipe, p: str | Path) -> Path:
    """Resolve a path written in the recipe (``data.path``, ``seeds.blueprint_dirs``) against its ``base_dir``."""
    return _against(loaded.base_dir, p)


def _against(directory: Path, p: str | Path) -> Path:
    candidate = Path(p).expanduser()
    return candidate if candidate.is_absolute() else directory / candidate


def _data_file_problem(section: Any, recipe_dir: Path) -> str | None:
    """Check ``data.path`` for ``source: file`` now, not minutes into a run.

    Works on the raw data so it is reported together with schema problems; values the schema
    rejects anyway (a non-string path) are left to the schema's message. A directory, a FIFO or a
    device there is named as what it is, not as a file that is missing.
    """
    if not isinstance(section, dict) or section.get("source") != "file":
        return None
    written = section.get("path")
    if not isinstance(written, str) or not written:
        return None
    if Path(written).suffix not in DATA_SUFFIXES:
        return f"data file must end in {' or '.join(DATA_SUFFIXES)} (got {written!r})"
    target = _against(recipe_dir, written)
    try:  # opened, not stat'ed, so what is refused here is what reading it would refuse; a FIFO never blocks
        os.close(open_regular(target, follow_links=True))
    except FileNotFoundError:
        return f"data file not found: {target}"
    except UnsafeInput as exc:
        return f"data file {exc}: {target}"
    return None


def _reading_order(problem: Problem) -> tuple[bool, bool, int]:
    """File problems by line, then unlocated ones, then command-line ones (ties keep schema order)."""
    return (problem.source == COMMAND_LINE, problem.line is None, problem.line or 0)
