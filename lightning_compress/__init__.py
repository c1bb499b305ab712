"""lightning_compress: compress PyTorch Lightning models while they train."""

from lightning_compress.pruning import GradualPruning
from lightning_compress.recipes import RecipeError, load_recipe

__all__ = ["GradualPruning", "RecipeError", "load_recipe"]
__version__ = "0.1.0"
