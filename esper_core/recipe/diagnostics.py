"""Turn recipe validation errors into located, readable problems.

pydantic reports *what* is wrong at a ``loc`` inside the data; the user needs *where*: a line of the
recipe file, or the command-line override that supplied the value. ``Locator`` answers where;
``validation_problems`` rewrites pydantic's messages where a plainer one helps (unknown keys list
the allowed ones, enums list the choices) and keeps them otherwise.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from esper_core.errors import Problem
from esper_core.recipe.overrides import COMMAND_LINE, Override
from esper_core.recipe.schema import Recipe
from esper_core.redact import redacted_text

Loc = tuple[str, ...]


class Locator:
    """Places a problem at a dotted field: in the file, or on the command line if an override set it."""

    def __init__(self, source: str, lines: dict[str, int], overrides: Sequence[Override]) -> None:
        self.source = source
        self.lines = lines
        self.overrides = overrides

    def problem(self, loc: Loc, message: str) -> Problem:
        field = ".".join(loc) or None
        override = self._override_for(loc)
        if override is not None:
            return Problem(COMMAND_LINE, f"override {redacted_text(override.text)!r}: {message}", field=field)
        return Problem(self.source, message, line=self._line(loc), field=field)

    def _line(self, loc: Loc) -> int | None:
        """Line of the deepest part of ``loc`` written in the file (a missing key: its parent's; a missing
        top-level key, such as a blueprint's ``name``: the top-level mapping's, so it has a line too)."""
        for end in range(len(loc), 0, -1):
            line = self.lines.get(".".join(loc[:end]))
            if line is not None:
                return line
        return self.lines.get("") if loc else None

    def _override_for(self, loc: Loc) -> Override | None:
        """The last override that set ``loc`` or a mapping above it; failing that, when the file never
        wrote ``loc``, the last one that set something below it (a section-level check it tripped)."""
        above = [o for o in self.overrides if loc[: len(o.keys)] == o.keys]
        if above:
            return above[-1]
        if ".".join(loc) in self.lines:
            return None
        below = [o for o in self.overrides if o.keys[: len(loc)] == loc]
        return below[-1] if below else None


def validation_problems(exc: ValidationError, locator: Locator, root: type[BaseModel] = Recipe,
                        tags: frozenset[str] = frozenset()) -> list[Problem]:
    """One problem per pydantic error, every one of them.

    ``root`` is the model that was validated; ``tags`` are the discriminator values of tagged unions
    (pydantic puts the chosen tag into the loc, but the user never wrote it as a key).
    """
    problems = []
    for error in exc.errors(include_url=False):
        # Drop pydantic's own loc parts such as "function-after[...]" or "[key]"; recipe keys never
        # contain brackets or parentheses.
        loc = tuple(str(part) for i, part in enumerate(error["loc"])
                    if not (isinstance(part, str) and ("[" in part or "(" in part))
                    and not (part in tags and i > 0 and isinstance(error["loc"][i - 1], int)))
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # the fault is the discriminator key (`op: linaer`), not the whole entry: say so and where
            discriminator = str(error.get("ctx", {}).get("discriminator", "")).strip("'")
            loc = (*loc, discriminator) if discriminator else loc
            problems.append(locator.problem(loc, _tag_message(error, discriminator, tags)))
            continue
        # the loc with the chosen tag kept (`ops.0.linear.bais`): it leads to the model of that entry
        model_loc = tuple(str(part) for part in error["loc"]
                          if not (isinstance(part, str) and ("[" in part or "(" in part)))
        problems.append(locator.problem(loc, _message(error, model_loc, root)))
    return problems


def _tag_message(error: ErrorDetails, discriminator: str, tags: frozenset[str]) -> str:
    """An unknown or missing tag of a tagged union (a blueprint op's ``op``), with the closest known one."""
    known = ", ".join(sorted(tags)) if tags else str(error.get("ctx", {}).get("expected_tags", ""))
    if error["type"] == "union_tag_not_found":
        return f"missing: every entry needs `{discriminator}` (one of: {known})"
    tag = str(error.get("ctx", {}).get("tag", ""))
    close = difflib.get_close_matches(tag, sorted(tags), n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown {discriminator} {tag!r}{hint} (known: {known})"


def _message(error: ErrorDetails, loc: Loc, root: type[BaseModel]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc, root)
    if kind == "literal_error":
        choices = _literal_choices(loc, root)
        if choices:
            return f"must be one of {', '.join(map(repr, choices))} (got {_show(value)})"
    if kind == "model_type":
        return f"must be a mapping of keys (got {_show(value)})"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    if kind in _EXPECTED:  # strict types: say what was written, since YAML decides the type by its spelling
        return f"must be {_EXPECTED[kind]} (got {_show(value)}, {_kind_of(value)})"
    if value is None or isinstance(value, (str, int, float)):
        return f"{error['msg']} (got {_show(value)})"
    return error["msg"]


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string"}


def _kind_of(value: Any) -> str:
    """How YAML read a value: quotes make a string, ``true``/``yes`` a boolean, a dot a float."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return ("a string: if it is meant as a number, write it without quotes and in plain digits (YAML reads "
                "forms such as 1e3 as text)") if _looks_numeric(value) else "a string"
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unknown_key(loc: Loc, root: type[BaseModel]) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "unknown key"
    allowed = [field.alias or name for name, field in model.model_fields.items()]  # `in`, as written, not `in_`
    close = difflib.get_close_matches(loc[-1], allowed, n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (allowed: {', '.join(allowed)})"


def _literal_choices(loc: Loc, root: type[BaseModel]) -> tuple[Any, ...]:
    model = _model_at(loc[:-1], root)
    field = model.model_fields.get(loc[-1]) if model is not None else None
    if field is None or get_origin(field.annotation) is not Literal:
        return ()
    return get_args(field.annotation)


def _model_at(loc: Loc, root: type[BaseModel]) -> type[BaseModel] | None:
    """The section model found by following ``loc`` from ``root`` (``None`` if it leaves the models).
    A list index steps into the list's items, and a tag (as pydantic puts the chosen member of a
    tagged union into the loc: ``ops.0.linear``) into that member, so blueprint ops list their keys too."""
    current: Any = root
    for part in loc:
        if get_origin(current) is Annotated:
            current = get_args(current)[0]
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is list and part.isdigit():
            current = get_args(current)[0]
        elif get_origin(current) in (Union, types.UnionType):
            current = next((member for member in get_args(current) if _tagged(member, part)), None)
        else:
            return None
    if get_origin(current) is Annotated:
        current = get_args(current)[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _tagged(member: Any, tag: str) -> bool:
    """Whether ``member`` is a model with a literal field (its discriminator) that allows ``tag``."""
    return isinstance(member, type) and issubclass(member, BaseModel) and any(
        get_origin(field.annotation) is Literal and tag in get_args(field.annotation)
        for field in member.model_fields.values())


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user would have written it in YAML, shortened; a password in a URL in it is ``***``
    (a mistyped ``storage.artifacts_url`` may carry one in its ``endpoint_url``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = redacted_text(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
