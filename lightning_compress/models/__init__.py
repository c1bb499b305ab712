"""Small reference models for the demo, the benchmarks and the tests."""

from lightning_compress._installed import minilm_path
from lightning_compress.models.classifier import ImageClassifier
from lightning_compress.models.cnn import ReferenceCNN
from lightning_compress.models.minilm import MiniLMClassifier

__all__ = ["ImageClassifier", "MiniLMClassifier", "ReferenceCNN", "minilm_path"]
