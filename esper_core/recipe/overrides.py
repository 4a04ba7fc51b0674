"""Command-line overrides: ``dotted.key=value`` arguments applied on top of a recipe file.

Values are YAML (``200`` is an int, ``[a, b]`` a list, ``true`` a bool, an empty value is null),
parsed with the same safety limits as recipe files. Every malformed argument is reported at once,
each naming the argument, so a user fixes a command line in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esper_core.errors import ConfigError, Problem
from esper_core.recipe.yaml_source import parse_yaml
from esper_core.redact import redacted_text

COMMAND_LINE = "<command line>"


@dataclass(frozen=True)
class Override:
    """One parsed argument; ``keys`` is the dotted key split into parts."""

    text: str
    keys: tuple[str, ...]
    value: Any


def apply_overrides(data: dict[str, Any], args: Sequence[str]) -> tuple[dict[str, Any], list[Override]]:
    """Return a copy of ``data`` with ``args`` applied in order (later ones win), and the parsed overrides.

    Only the mappings on an override's path are copied, so ``data`` -- whose mappings YAML aliases may
    share -- is never changed. Missing mappings on the path are created; a null one is replaced.
    """
    result = dict(data)
    overrides: list[Override] = []
    problems: list[Problem] = []
    for text in args:
        try:
            override = _parse(text)
            _set(result, override)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        overrides.append(override)
    if problems:
        raise ConfigError(problems)
    return result, overrides


def _parse(text: str) -> Override:
    key, sep, raw_value = text.partition("=")
    if not sep:
        raise _malformed(text, "is not key=value (e.g. trainer.max_steps=200)")
    keys = tuple(part.strip() for part in key.split("."))
    if not all(keys):
        raise _malformed(text, "has an empty key or key part")
    try:
        value = parse_yaml(raw_value, COMMAND_LINE).data
    except ConfigError as exc:
        raise _malformed(text, f"has a bad value: {exc.problems[0].message}") from None
    return Override(text, keys, value)


def _set(root: dict[str, Any], override: Override) -> None:
    node = root
    for depth, key in enumerate(override.keys[:-1]):
        child = node.get(key)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            parent = ".".join(override.keys[: depth + 1])
            raise _malformed(override.text, f"sets a key inside {parent!r}, which holds "
                             f"{child!r}, not a mapping")
        else:
            child = dict(child)
        node[key] = child
        node = child
    node[override.keys[-1]] = override.value


def _malformed(text: str, why: str) -> ConfigError:
    """The override quoted as typed, but for a password in a URL in it (shown as ``***``)."""
    return ConfigError(Problem(COMMAND_LINE, f"override {redacted_text(text)!r} {why}"))
