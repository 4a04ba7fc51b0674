"""Recipes: the YAML file that says what to train and how to grow it (schema, loading, reference)."""

from esper_core.recipe.load import LoadedRecipe, load_recipe, resolve_relative
from esper_core.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "resolve_relative"]
