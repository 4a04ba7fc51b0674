"""Optional features and the pip extra that installs each.

The base install holds what every run needs (PyTorch, the CLI, the recipe schema, the local SQLite
asset repository, Prometheus metrics). A shared Redis cache, a PostgreSQL repository, S3, ONNX,
Lightning, TensorBoard, MLflow and Hugging Face models are extras, so a laptop user does not install
database drivers and cloud SDKs they never use.

A feature that needs an extra calls :func:`require_extra` *before* it starts work, so a recipe or
URL that asks for a tier whose extra is missing stops at once with one line naming the command that
fixes it (exit 2), instead of an ``ImportError`` traceback half-way through a run. The check uses
``importlib.util.find_spec``: it does not import the package, so it costs microseconds.
"""

from __future__ import annotations

import importlib.util

from esper_core import DISTRIBUTION
from esper_core.errors import ConfigError, Problem

EXTRAS: dict[str, tuple[str, ...]] = {
    "redis": ("redis",),
    "postgres": ("psycopg",),
    "s3": ("boto3",),
    "lightning": ("lightning",),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "transformers": ("transformers",),
}
"""Extra name -> the top-level modules it provides (must match ``[project.optional-dependencies]``
in pyproject.toml; a test checks that they agree)."""


class MissingExtra(ConfigError):
    """A recipe, URL or option asks for a feature whose optional dependencies are not installed."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, quoted for a POSIX shell."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when the extra is installed)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, feature: str, *, source: str, field: str | None = None) -> None:
    """Raise :class:`MissingExtra` unless ``extra`` is installed.

    ``feature`` says what asked for it (``"redis:// URLs"``); ``source``/``field`` locate the
    request as in any other :class:`~esper_core.errors.Problem` (a recipe field, an environment
    variable, a command-line option).
    """
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(Problem(source, f"{feature} need the optional package {', '.join(missing)}: "
                                   f"{install_hint(extra)}", field=field))
