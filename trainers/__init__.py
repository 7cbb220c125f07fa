"""Training stages as `transformers.Trainer` subclasses, each with its `TrainingArguments` subclass."""

from .common import CaptionCollator, CaptionEvaluator, caption_statistics, mmd_rbf
from .init_trainer import InitConfig, InitTrainer, InitTrainingData

__all__ = [
    "CaptionCollator", "CaptionEvaluator", "InitConfig", "InitTrainer", "InitTrainingData", "caption_statistics",
    "mmd_rbf",
]
