"""Recipes: the YAML file that says what to train and how to grow it (schema, loading, reference)."""

from esper_core.recipe.checks import check_device, check_output_dir
from esper_core.recipe.load import LoadedRecipe, factories_allowed, load_recipe, resolve_relative
from esper_core.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "check_device", "check_output_dir", "factories_allowed", "load_recipe",
           "resolve_relative"]
