"""Training stages as `transformers.Trainer` subclasses, each with its `TrainingArguments` subclass, and the settings
each stage of `train.py` takes (`recipe`) and runs (`stages`)."""

from .common import CaptionCollator, CaptionConfig, CaptionEvaluator, CaptionTrainer, caption_statistics, mmd_rbf
from .discriminator import Discriminator
from .init_trainer import InitConfig, InitTrainer, InitTrainingData, SupervisedConfig
from .rewards import ClipRewards, SemanticRewardWeights
from .scst_trainer import SCSTConfig, SCSTTrainer

__all__ = [
    "CaptionCollator", "CaptionConfig", "CaptionEvaluator", "CaptionTrainer", "ClipRewards", "Discriminator",
    "InitConfig", "InitTrainer", "InitTrainingData", "SCSTConfig", "SCSTTrainer", "SemanticRewardWeights",
    "SupervisedConfig", "caption_statistics", "mmd_rbf",
]
