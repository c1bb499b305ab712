"""Small reference models for the demo, the benchmarks and the tests."""

from lightning_compress.models.classifier import ImageClassifier
from lightning_compress.models.cnn import ReferenceCNN
from lightning_compress.models.minilm import MiniLMClassifier, minilm_path

__all__ = ["ImageClassifier", "MiniLMClassifier", "ReferenceCNN", "minilm_path"]
