"""The source files of the code a recipe names, bound to the run that imported them.

``data.factory``, ``model.factory`` and ``task.function`` name code as ``package.module:function``,
usually a module kept beside the recipe. ``recipe.sha256`` binds the recipe's text to the run, not
that code: a factory edited between a checkpoint and ``esper resume`` (a ReLU swapped for a Tanh, a
dataset yielding other samples) continued the run with other code, silently when the shapes still
fitted, and as a bare "size mismatch" in ``state.json`` when they did not. A run therefore records the
file each such module was imported from and its sha256 (``recipe_code`` in every checkpoint's state and
in ``final/manifest.json``, beside the recipe's own record); a resume refuses a module whose file
differs, ``load_run``/``esper export`` warn. The comparison is of the bytes, not the path: the same
module at another place (a project moved, a run resumed on another machine) is the same code. Only the
named module's own file is hashed (helpers it imports in turn are not), and only the user's code: a
module of the standard library or of an installed package (``torch.nn.functional:cross_entropy`` as
``task.function``) is versioned by its package, and binding it would refuse every resume after an
upgrade.

What a user reads of the binding comes from here too: ``esper train --dry-run`` lists the files a run
would bind, and ``esper report`` lists those a run recorded with :func:`file_state`, whether the file
at the recorded place still holds those bytes. The recorded path is absolute (a resume and the report
read it wherever they run); :meth:`ModuleSource.shown` is the readable form, relative to the recipe's
directory when the file is inside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from esper_core.errors import CheckpointError, Problem
from esper_core.recipe.load import FACTORY_FIELDS, LoadedRecipe
from esper_core.safe_read import UnsafeInput, sha256_regular

FileState = Literal["matches", "differs", "not found", "unreadable"]
"""What the file at a recorded path holds now, against the sha256 the run recorded for it."""


@dataclass(frozen=True)
class ModuleSource:
    """The file a module was imported from, and the sha256 of its bytes."""

    file: str
    sha256: str

    def fields(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256}

    def shown(self, base_dir: Path | None) -> str:
        """The file as a user reads it: relative to ``base_dir`` (the recipe's directory) when inside it,
        since the absolute path mostly repeats where the project lies; otherwise absolute, as recorded."""
        file = Path(self.file)
        base = base_dir.resolve() if base_dir is not None else None  # the file was recorded resolved
        return str(file.relative_to(base)) if base is not None and file.is_relative_to(base) else self.file


def code_modules(loaded: LoadedRecipe) -> dict[str, str]:
    """Each module the recipe names code in, with the first field naming it (``model.factory``)."""
    return named_modules({f"{section}.{key}": getattr(getattr(loaded.recipe, section), key)
                          for section, key in FACTORY_FIELDS})


def named_modules(specs: Mapping[str, Any]) -> dict[str, str]:
    """Each module the values of ``specs`` (recipe field -> its value) name, with the first field naming
    it. Apart from :func:`code_modules` for a report, which reads a run's ``recipe.yaml`` as plain data:
    a recipe found in someone's run directory is not loaded as one to be run."""
    named: dict[str, str] = {}
    for field, spec in specs.items():
        if isinstance(spec, str) and ":" in spec:
            named.setdefault(spec.partition(":")[0], field)
    return named


def module_sources(loaded: LoadedRecipe) -> dict[str, ModuleSource]:
    """The source of each module :func:`code_modules` names: the file Python imported it from (or, not
    imported yet in this process, would import it from the recipe's directory now). A module without a
    file (built in, a namespace package) or not found is left out: importing it says what is missing."""
    sources = {}
    with loaded.importable():
        for name in code_modules(loaded):
            file = _module_file(name)
            if file is not None and not _installed(file):
                sources[name] = ModuleSource(str(file), hashlib.sha256(file.read_bytes()).hexdigest())
    return sources


def file_state(source: ModuleSource) -> tuple[FileState, str]:
    """Whether the file at ``source.file`` still holds the recorded bytes, and that in words
    ("matches", "differs (sha256 … now)", "not found at PATH", "unreadable: PATH is not a regular file
    (it is a directory)"). The file is read, never imported: a report on someone else's run executes
    none of its code, and says nothing about which file an import would find now (a resume checks that)."""
    path = Path(source.file)
    try:
        now = sha256_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        return "not found", f"not found at {path}"
    except UnsafeInput as exc:  # a link, a directory, a FIFO: what stands there is not the recorded file
        return "unreadable", f"unreadable: {path} {exc}"
    except OSError as exc:
        return "unreadable", f"unreadable: {path} ({exc.strerror or exc})"
    if now == source.sha256:
        return "matches", "matches"
    return "differs", f"differs (sha256 {now[:12]}… now)"


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    try:
        origin = getattr(module, "__file__", None) if module is not None else \
            getattr(importlib.util.find_spec(name), "origin", None)
    except (ImportError, ValueError):
        return None
    path = Path(origin) if isinstance(origin, str) else None
    return path.resolve() if path is not None and path.is_file() else None


def _installed(file: Path) -> bool:
    """Whether ``file`` belongs to the standard library or an installed package (not the user's code)."""
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(file.is_relative_to(Path(root).resolve()) for root in roots)


def read_sources(value: Any, where: str) -> dict[str, ModuleSource]:
    """``recipe_code`` as a record holds it (absent in runs recorded before it existed: nothing to check)."""
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(name, str) and isinstance(entry, Mapping)
                                          and isinstance(entry.get("file"), str)
                                          and isinstance(entry.get("sha256"), str) for name, entry in value.items()):
        return {name: ModuleSource(entry["file"], entry["sha256"]) for name, entry in value.items()}
    raise CheckpointError(Problem(where, "recipe_code is not a map of module -> {file, sha256}"))


def changed_sources(loaded: LoadedRecipe, recorded: Mapping[str, ModuleSource], current: Mapping[str, ModuleSource],
                    consequence: str) -> list[Problem]:
    """One problem per recorded module whose file is now another file, or holds other bytes, at that
    file and the recipe field naming the module, ending in ``consequence`` (what it means, what to do)."""
    fields = code_modules(loaded)
    problems = []
    for name, then in recorded.items():
        now = current.get(name)
        if now is not None and now.sha256 == then.sha256:  # the same code, wherever it now lies
            continue
        hashes = f"sha256 {then.sha256[:12]}… then, {now.sha256[:12]}… now" if now is not None else ""
        if now is None:
            change = f"is no longer imported from a file (recorded: {then.file})"
        elif now.file != then.file:
            change = (f"is now imported from {now.file}, whose code is not that of {then.file}, which the run "
                      f"recorded ({hashes})")
        else:
            change = f"changed since the run recorded it ({hashes})"
        problems.append(Problem(now.file if now else then.file, f"module '{name}' {change}: {consequence}",
                                field=fields.get(name)))
    return problems
