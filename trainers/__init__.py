"""Training stages as `transformers.Trainer` subclasses, each with its `TrainingArguments` subclass."""

from .common import CaptionCollator, CaptionConfig, CaptionEvaluator, CaptionTrainer, caption_statistics, mmd_rbf
from .discriminator import Discriminator
from .init_trainer import InitConfig, InitTrainer, InitTrainingData
from .rewards import ClipRewards, SemanticWeights
from .scst_trainer import SCSTConfig, SCSTTrainer

__all__ = [
    "CaptionCollator", "CaptionConfig", "CaptionEvaluator", "CaptionTrainer", "ClipRewards", "Discriminator", "InitConfig",
    "InitTrainer", "InitTrainingData", "SCSTConfig", "SCSTTrainer", "SemanticWeights", "caption_statistics",
    "mmd_rbf",
]
