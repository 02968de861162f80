"""Training: one engine (:mod:`.engine`) that runs a task - retrieval (:mod:`.retrieval_task`:
P x K batches, the configured loss terms), the attribute classifier (:mod:`.attribute_task`),
and the rounds of cross-domain mining (:mod:`.adapt`).

* :class:`TrainConfig`, :func:`load_train_config`, :func:`apply_overrides` - settings.
* :func:`train` - one retrieval run (single process or DDP), resumable from ``out/last``.
"""

from fashionlens.config import apply_overrides
from fashionlens.training.config import TrainConfig, load_train_config
from fashionlens.training.retrieval_task import train

__all__ = ["TrainConfig", "apply_overrides", "load_train_config", "train"]
