"""Training stages as `transformers.Trainer` subclasses, each with its `TrainingArguments` subclass."""

from .common import CaptionCollator, CaptionEvaluator, CaptionTrainer, caption_statistics, mmd_rbf
from .init_trainer import InitConfig, InitTrainer, InitTrainingData

__all__ = [
    "CaptionCollator", "CaptionEvaluator", "CaptionTrainer", "InitConfig", "InitTrainer", "InitTrainingData", "caption_statistics",
    "mmd_rbf",
]
