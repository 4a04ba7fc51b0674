"""Generate ``docs/recipe-reference.md`` from the recipe schema.

The schema is the single source of truth for keys, types, limits, defaults and descriptions; the
reference is rendered from it so the two cannot disagree. ``--check`` (run by the tests and CI)
fails when someone changed the schema without regenerating the file.

    python -m esper_core.recipe.reference           # rewrite the file
    python -m esper_core.recipe.reference --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from esper_core.docgen import generated_page_main
from esper_core.recipe.schema import Recipe

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"

_HEADER = """\
<!-- Generated from esper_core/recipe/schema.py by `python -m esper_core.recipe.reference`; do not edit. -->

# Recipe reference

A recipe is a YAML mapping of the sections below. Every section and every key is optional and
takes the default shown; an unknown key is an error. Any key can be set from the command line as
`section.key=value` (the value is read as YAML: `200` is an integer, `[a, b]` a list, `true` a boolean),
e.g. `esper train recipe.yaml trainer.max_steps=200 seeds.per_layer=2`.
"""

_SCALARS = {int: "int", float: "float", str: "string", bool: "bool", Any: "any"}


def render_reference() -> str:
    """The whole Markdown reference."""
    parts = [_HEADER]
    for name, field in Recipe.model_fields.items():
        section = field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel), f"{name} is not a section"
        parts.extend(_tables(name, field.description or "", section))
    return "\n".join(parts)


def _tables(path: str, description: str, model: type[BaseModel]) -> Iterator[str]:
    """The table of ``model`` at dotted ``path``, then those of its sub-sections."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[str, FieldInfo, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        sub_model = section_model(field.annotation)
        if sub_model is not None:
            nested.append((f"{path}.{name}", field, sub_model))
        if sub_model is not None and field.annotation is sub_model:
            default = f"see `{path}.{name}`"
        else:  # an optional section (`trainer.early_stopping`) is off by default: its default is null
            default = default_text(field.get_default(call_default_factory=True))
        cells = [f"`{name}`", field_type(field), default, field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    yield f"## `{path}`\n\n{description}\n\n" + "\n".join(rows) + "\n"
    for sub_path, field, sub_model in nested:
        yield from _tables(sub_path, field.description or "", sub_model)


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field typed ``Section`` or ``Section | None``, else ``None``. An optional
    section still has keys a user must be able to look up, so it gets its own table like any other."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [arg for arg in get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def field_type(field: FieldInfo) -> str:
    """A field's type and limits in words (`int, >= 1`)."""
    limits = [limit_text(item) for item in field.metadata]
    return ", ".join([_annotation(field.annotation), *(limit for limit in limits if limit)])


def _annotation(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # a constrained item (e.g. a strict float inside a tuple): its type, in words
        return _annotation(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin in (Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        text = " or ".join(_annotation(arg) for arg in kept)
        return f"{text} or null" if len(kept) < len(args) else text
    if origin is list:
        return f"list of {_annotation(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_annotation(arg) for arg in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return _SCALARS.get(annotation, str(annotation))


def limit_text(item: Any) -> str:
    """A constraint from a field's metadata in words; '' for one that says nothing to a user."""
    if isinstance(item, annotated_types.Ge):
        return f">= {item.ge}"
    if isinstance(item, annotated_types.Gt):
        return f"> {item.gt}"
    if isinstance(item, annotated_types.Le):
        return f"<= {item.le}"
    if isinstance(item, annotated_types.Lt):
        return f"< {item.lt}"
    if isinstance(item, annotated_types.MinLen):
        return f"length >= {item.min_length}" if item.min_length > 0 else ""
    if isinstance(item, annotated_types.MaxLen):
        return f"length <= {item.max_length}"
    pattern = getattr(item, "pattern", None)
    return f"matching `{pattern}`" if pattern else ""


def default_text(value: Any) -> str:
    """A default value as Markdown code."""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the reference, or with ``--check`` report (exit 1) whether it is stale."""
    return generated_page_main("python -m esper_core.recipe.reference", __doc__.split("\n")[0], REFERENCE_PATH,
                               render_reference, argv)


if __name__ == "__main__":
    sys.exit(main())
