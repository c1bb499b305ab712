"""Bundled DataModules over data that is installed locally (no network): digits, Fashion-MNIST, Rotten Tomatoes."""

from lightning_compress.data.digits import DigitsDataModule
from lightning_compress.data.errors import MissingDataError
from lightning_compress.data.fashion_mnist import FashionMNISTDataModule
from lightning_compress.data.rotten_tomatoes import RottenTomatoesDataModule

__all__ = ["DigitsDataModule", "FashionMNISTDataModule", "MissingDataError", "RottenTomatoesDataModule"]
