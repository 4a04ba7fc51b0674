"""The recipe's JSON Schema, generated from the pydantic models in :mod:`esper_core.recipe.schema`.

Editors (VS Code's YAML extension, JetBrains IDEs) use it to complete and check recipe keys as
they are typed: put ``# yaml-language-server: $schema=recipe.schema.json`` at the top of a recipe.
It is generated, never written by hand, so it cannot disagree with what ``esper train`` accepts
(unknown keys are refused by both: every section has ``additionalProperties: false``).
"""

from __future__ import annotations

from typing import Any

from esper_core.recipe.schema import Recipe

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a whole recipe."""
    from esper_core import DISTRIBUTION, __version__

    generated = Recipe.model_json_schema(mode="validation")
    return {"$schema": DIALECT, "title": "Esper recipe",
            "description": f"Recipe for `esper train` ({DISTRIBUTION} {__version__}); generated from the "
                           "recipe models, see docs/recipe-reference.md.", **{k: v for k, v in generated.items()
                                                                             if k not in ("title", "description")}}
