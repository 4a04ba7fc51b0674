"""Storage tiers: the persistent kernel cache and the asset repository (DESIGN, "Storage tiers").

``open_kernel_store(cfg)`` is the one entry point the trainer and ``esper compile`` use. Names are
imported on first use, so ``esper_core.storage.repository`` can be used without PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper_core.recipe.schema import StorageConfig
    from esper_core.storage.cache import PersistentKernelCache

_EXPORTS = {
    "AssetRepository": "esper_core.storage.repository",
    "CompileLease": "esper_core.storage.lease",
    "PersistentKernelCache": "esper_core.storage.cache",
    "StorageSettings": "esper_core.storage.settings",
}
__all__ = sorted([*_EXPORTS, "open_kernel_store"])


def open_kernel_store(cfg: StorageConfig, env: Mapping[str, str] | None = None) -> PersistentKernelCache:
    """The tiered kernel store for a recipe's ``storage`` section (env ``ESPER_DATABASE_URL`` /
    ``ESPER_REDIS_URL`` win over the recipe; ``ESPER_SIGNING_KEY`` signs shared entries).

    Cheap and never blocking: no server is contacted here, so it works the same when every remote
    tier is down (they are then skipped, and said so once). Raises ``ConfigError`` for malformed
    settings. Close it (or use it as a context manager) to flush usage counters.
    """
    from esper_core.storage.cache import PersistentKernelCache
    from esper_core.storage.settings import StorageSettings

    return PersistentKernelCache.open(StorageSettings.resolve(cfg, env))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
