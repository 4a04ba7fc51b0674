"""Checks of a loaded recipe against the machine it is about to run on, located at the recipe field.

They are not schema rules because their answer depends on this machine and this moment (a path that
is a file here, no GPU here); the trainer calls them before it creates anything, so a user sees
``file:line: field: message`` and exit 2 instead of a ``NotADirectoryError`` traceback minutes in.
"""

from __future__ import annotations

import os
from pathlib import Path

from esper_core.errors import ConfigError
from esper_core.recipe.load import LoadedRecipe


def check_output_dir(loaded: LoadedRecipe) -> None:
    """``run.output_dir`` must be a directory (or creatable as one) that this process can write into.

    Call before creating the run directory (``<output_dir>/<run.name>``)."""
    written = loaded.recipe.run.output_dir
    base = Path(written).expanduser()
    existing = next((p for p in (base, *base.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:
        return
    if not existing.is_dir():
        where = "" if existing == base else f" ({existing} is in its path)"
        raise ConfigError(loaded.locate("run.output_dir", f"{written!r} is not a directory: {existing} is a file"
                                        f"{where}; name a directory for run directories"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(loaded.locate("run.output_dir", f"{existing} is not writable by this user"))
    dangling = dangling_link(base.resolve() / loaded.recipe.run.name)
    if dangling:
        raise ConfigError(loaded.locate("run.output_dir", dangling))


def dangling_link(path: Path) -> str | None:
    """What to tell a user whose run directory would be ``path`` where a symbolic link to nothing
    stands: ``exists()`` follows the link and says no, so the directory's creation failed with a bare
    "File exists" that named neither the link nor what to do. ``None`` where no such link is."""
    if not path.is_symlink() or path.exists():
        return None
    return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: remove the link, "
            "or choose another run.output_dir or run.name")


def check_device(loaded: LoadedRecipe, cuda_available: bool) -> None:
    """``run.device: cuda`` needs a CUDA device; the caller says whether there is one (this module
    does not import torch). Call before selecting the device."""
    if loaded.recipe.run.device == "cuda" and not cuda_available:
        raise ConfigError(loaded.locate("run.device", "is 'cuda' but no CUDA device is available here; use "
                                        "`auto` (CUDA when present, else CPU) or `cpu`"))
