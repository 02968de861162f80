"""Training (thesis A): batch-all triplet loss on P x K batches, optional identity loss.

* :class:`TrainConfig`, :func:`load_train_config`, :func:`apply_overrides` - settings.
* :func:`train` - one run (single process or DDP), resumable from ``out/last``.
"""

from fashionlens.training.config import TrainConfig, apply_overrides, load_train_config
from fashionlens.training.trainer import train

__all__ = ["TrainConfig", "apply_overrides", "load_train_config", "train"]
