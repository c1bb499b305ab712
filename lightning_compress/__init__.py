"""lightning_compress: compress PyTorch Lightning models while they train."""

from lightning_compress.recipes import RecipeError, load_recipe

__all__ = ["RecipeError", "load_recipe"]
__version__ = "0.1.0"
