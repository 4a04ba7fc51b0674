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
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_core.errors import CheckpointError, Problem
from esper_core.recipe.load import FACTORY_FIELDS, LoadedRecipe


@dataclass(frozen=True)
class ModuleSource:
    """The file a module was imported from, and the sha256 of its bytes."""

    file: str
    sha256: str

    def fields(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256}


def code_modules(loaded: LoadedRecipe) -> dict[str, str]:
    """Each module the recipe names code in, with the first field naming it (``model.factory``)."""
    named: dict[str, str] = {}
    for section, key in FACTORY_FIELDS:
        spec = getattr(getattr(loaded.recipe, section), key)
        if isinstance(spec, str) and ":" in spec:
            named.setdefault(spec.partition(":")[0], f"{section}.{key}")
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
