"""Training: data, augmentation, TOFA losses, the trainer, zero-cost selection, run outputs."""

from .checkpoint import load_checkpoint
from .config import STRATEGIES, TrainConfig
from .data import DataSplits, load_data
from .losses import LOSS_VARIANTS
from .selection import SelectionIndex, select_subnet
from .trainer import Trainer

__all__ = [
    "LOSS_VARIANTS",
    "STRATEGIES",
    "DataSplits",
    "SelectionIndex",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_data",
    "select_subnet",
]
