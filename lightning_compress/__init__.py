"""lightning_compress: compress PyTorch Lightning models while they train."""

from lightning_compress.export import CompressedFileError, load_compressed, save_compressed
from lightning_compress.lowrank import LowRankRefactoring
from lightning_compress.monitor import CompressionMonitor
from lightning_compress.preemption import CheckpointRefused, PreemptionCheckpoint
from lightning_compress.pruning import GradualPruning
from lightning_compress.quantization import QuantizationAwareTraining, convert_to_int8
from lightning_compress.recipes import RecipeError, load_recipe
from lightning_compress.stabilizers import GradientClipping, LearningRateWarmup

__all__ = [
    "CheckpointRefused",
    "CompressedFileError",
    "CompressionMonitor",
    "GradientClipping",
    "GradualPruning",
    "LearningRateWarmup",
    "LowRankRefactoring",
    "PreemptionCheckpoint",
    "QuantizationAwareTraining",
    "RecipeError",
    "load_compressed",
    "load_recipe",
    "convert_to_int8",
    "save_compressed",
]
__version__ = "0.1.0"
